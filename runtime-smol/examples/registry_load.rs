//! How many registry requests one director's connection gets through a Redis or Valkey
//! server, pipelined as a director's registry task sends them (32 at a time): prints requests
//! and keys per second for each kind a director sends. `docs/CLUSTER.md` turns the figures
//! into a scaling estimate.
//!
//! Run: `redis-server --port 6390 --save '' --appendonly no &` then
//! `cargo run --release -p tscf-runtime-smol --example registry_load -- redis://127.0.0.1:6390/`.
//! It writes under the namespace `load`, and removes what it wrote.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use tscf_runtime_smol::core::cluster::{DirectorName, RegistryRequest, TunnelRecord};
use tscf_runtime_smol::RedisRegistry;

/// Requests in one pipeline, as the director's registry task sends them.
const PIPELINE: usize = 32;
const TUNNELS: u32 = 50_000;

fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "redis://127.0.0.1:6379/".to_owned());
    smol::block_on(async {
        let mut registry = RedisRegistry::new(&url, "load").unwrap();
        let owner = DirectorName::new("load-a").unwrap();
        let lease = Duration::from_secs(600);
        let addr = |k: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + k));
        let record = |k: u32| TunnelRecord {
            id: u64::from(k) + 1,
            ipv4: match addr(k) {
                IpAddr::V4(a) => Some(a),
                IpAddr::V6(_) => None,
            },
            ipv6: None,
            salt: [k as u8; 16],
            owner: owner.clone(),
        };
        println!("registry requests through one connection to {url}, {PIPELINE} per pipeline:");
        let mut run = async |what: &str, keys_each: usize, requests: Vec<RegistryRequest>| {
            let n = requests.len();
            let start = Instant::now();
            for chunk in requests.chunks(PIPELINE) {
                let answers = registry.execute_all(chunk).await;
                assert_eq!(answers.len(), chunk.len());
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "  {what}: {:.0} requests/s, {:.0} keys/s",
                n as f64 / secs,
                (n * keys_each) as f64 / secs
            );
        };
        let claims = (0..TUNNELS)
            .map(|k| RegistryRequest::Claim {
                addr: addr(k),
                owner: owner.clone(),
                lease,
            })
            .collect();
        run("Claim", 1, claims).await;
        let puts = (0..TUNNELS)
            .map(|k| RegistryRequest::Put {
                record: record(k),
                lease,
            })
            .collect();
        run("Put (record and one address)", 2, puts).await;
        let gets = (0..TUNNELS)
            .map(|k| RegistryRequest::GetTunnel {
                id: u64::from(k) + 1,
            })
            .collect();
        run("GetTunnel", 1, gets).await;
        let batch = 512;
        let renews: Vec<RegistryRequest> = (0..TUNNELS / batch)
            .map(|b| RegistryRequest::Renew {
                owner: owner.clone(),
                tunnels: (b * batch..(b + 1) * batch)
                    .map(|k| u64::from(k) + 1)
                    .collect(),
                addresses: (b * batch..(b + 1) * batch).map(addr).collect(),
                lease,
            })
            .collect();
        run(
            "Renew (512 tunnels and their addresses)",
            2 * batch as usize,
            renews,
        )
        .await;
        let removes = (0..TUNNELS)
            .map(|k| RegistryRequest::Remove {
                id: u64::from(k) + 1,
                addresses: vec![addr(k)],
                owner: owner.clone(),
            })
            .collect();
        run("Remove (record and one address)", 2, removes).await;
    });
}
