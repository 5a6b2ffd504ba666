//! The Redis registry against the in-memory one: the same requests, the same answers, on a
//! `redis-server` of the test's own on loopback; and two directors of one cluster sharing it,
//! linked by their mesh, relaying between their clients.
//!
//! `redis-server` comes from `scripts/lab-deps`; without it these tests fail saying so, unless
//! `TSCF_SKIP_REDIS=1`, under which they are skipped.

#[path = "support/redis.rs"]
mod redis;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use redis::{free_port, write_cluster_files, RedisServer, TempDir, BOUND};

use tscf_core::cluster::{
    AddressHolder, DirectorName, MemoryRegistry, RegistryRequest, RegistryResponse, TunnelRecord,
    SALT_LEN,
};
use tscf_runtime_smol::RedisRegistry;

/// How long a lease that must end during a test runs.
const SHORT: Duration = Duration::from_millis(500);
/// How long a lease that must not end during a test runs.
const LONG: Duration = Duration::from_secs(600);

fn name(n: &str) -> DirectorName {
    DirectorName::new(n).expect("a name")
}

fn v4(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 77, 0, last))
}

/// The two registries side by side.
struct Both {
    memory: MemoryRegistry,
    redis: RedisRegistry,
}

impl Both {
    /// Executes `request` on both and checks that they answer alike.
    async fn execute(&mut self, request: RegistryRequest) -> RegistryResponse {
        let memory = self.memory.execute(Instant::now(), &request);
        let redis = self.redis.execute(&request).await;
        assert_eq!(memory, redis, "the registries differ on {request:?}");
        memory
    }

    /// Executes `request` on each until its answer is `expected` (a lease ran out), within
    /// the bound.
    async fn until(&mut self, request: RegistryRequest, expected: RegistryResponse) {
        let deadline = Instant::now() + BOUND;
        while self.memory.execute(Instant::now(), &request) != expected {
            assert!(
                Instant::now() < deadline,
                "memory: {request:?} never gave {expected:?}"
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }
        loop {
            let answer = self.redis.execute(&request).await;
            if answer == expected {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis: {request:?} gave {answer:?}"
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }
    }
}

#[test]
fn redis_answers_like_memory() {
    let Some(server) = RedisServer::start(None) else {
        return;
    };
    smol::block_on(async {
        let mut r = Both {
            memory: MemoryRegistry::new(),
            redis: RedisRegistry::new(&server.url(), "conformance").expect("a URL"),
        };
        let claim = |addr, owner: &str, lease| RegistryRequest::Claim {
            addr,
            owner: name(owner),
            lease,
        };
        let get_address = |addr| RegistryRequest::GetAddress { addr };
        let get_tunnel = |id| RegistryRequest::GetTunnel { id };

        // Claims: once, until the lease ends.
        assert_eq!(
            r.execute(claim(v4(1), "dir-a", LONG)).await,
            RegistryResponse::Claimed(true)
        );
        r.execute(claim(v4(1), "dir-b", LONG)).await;
        r.execute(claim(v4(9), "dir-a", SHORT)).await;
        assert_eq!(
            r.execute(claim(v4(9), "dir-b", LONG)).await,
            RegistryResponse::Claimed(false)
        );
        r.until(claim(v4(9), "dir-b", LONG), RegistryResponse::Claimed(true))
            .await;
        r.execute(get_address(v4(9))).await;
        r.execute(get_address(v4(1))).await;
        assert_eq!(
            r.execute(get_address(v4(200))).await,
            RegistryResponse::Address(None)
        );

        // A record and its addresses.
        let record = TunnelRecord {
            id: 0x10,
            ipv4: Some(Ipv4Addr::new(10, 77, 0, 2)),
            ipv6: Some("fd77::2".parse().expect("an address")),
            salt: [0xa5; SALT_LEN],
            owner: name("dir-a"),
        };
        let put = |record: &TunnelRecord, lease| RegistryRequest::Put {
            record: record.clone(),
            lease,
        };
        r.execute(put(&record, LONG)).await;
        assert_eq!(
            r.execute(get_tunnel(0x10)).await,
            RegistryResponse::Tunnel(Some(record.clone()))
        );
        assert_eq!(
            r.execute(get_address(v4(2))).await,
            RegistryResponse::Address(Some(AddressHolder {
                owner: name("dir-a"),
                tunnel: 0x10,
            }))
        );
        r.execute(get_address(record.ipv6.expect("set").into()))
            .await;
        assert_eq!(
            r.execute(get_tunnel(0x11)).await,
            RegistryResponse::Tunnel(None)
        );

        // Renewal: the owner's shortens the leases to SHORT; another director's renewal for
        // LONG afterwards leaves them alone, so they run out.
        let renew = |owner: &str, lease| RegistryRequest::Renew {
            owner: name(owner),
            tunnels: vec![0x10],
            addresses: vec![v4(1), v4(2), record.ipv6.expect("set").into()],
            lease,
        };
        r.execute(renew("dir-a", SHORT)).await;
        r.execute(renew("dir-b", LONG)).await;
        r.execute(RegistryRequest::Renew {
            owner: name("dir-a"),
            tunnels: vec![],
            addresses: vec![],
            lease: LONG,
        })
        .await;
        r.until(get_tunnel(0x10), RegistryResponse::Tunnel(None))
            .await;
        r.until(get_address(v4(1)), RegistryResponse::Address(None))
            .await;
        r.until(get_address(v4(2)), RegistryResponse::Address(None))
            .await;

        // Removal: only by the owner; a tunnel adopted elsewhere stays.
        let theirs = TunnelRecord {
            id: 0x20,
            ipv4: Some(Ipv4Addr::new(10, 77, 0, 3)),
            ipv6: None,
            salt: [1; SALT_LEN],
            owner: name("dir-b"),
        };
        r.execute(put(&theirs, LONG)).await;
        let remove = |owner: &str| RegistryRequest::Remove {
            id: 0x20,
            addresses: vec![v4(3)],
            owner: name(owner),
        };
        r.execute(remove("dir-a")).await;
        assert_eq!(
            r.execute(get_tunnel(0x20)).await,
            RegistryResponse::Tunnel(Some(theirs.clone()))
        );
        let adopted = TunnelRecord {
            owner: name("dir-c"),
            ..theirs.clone()
        };
        r.execute(put(&adopted, LONG)).await;
        r.execute(remove("dir-b")).await;
        assert_eq!(
            r.execute(get_tunnel(0x20)).await,
            RegistryResponse::Tunnel(Some(adopted))
        );
        r.execute(get_address(v4(3))).await;
        r.execute(remove("dir-c")).await;
        r.execute(get_tunnel(0x20)).await;
        assert_eq!(
            r.execute(get_address(v4(3))).await,
            RegistryResponse::Address(None)
        );

        // Heartbeats: every director whose lease runs, in name order.
        let beat = |n: &str, port: u16, lease| RegistryRequest::Heartbeat {
            name: name(n),
            mesh: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            lease,
        };
        r.execute(beat("dir-c", 4453, LONG)).await;
        r.execute(beat("dir-b", 4452, SHORT)).await;
        let RegistryResponse::Directors(all) = r.execute(beat("dir-a", 4451, LONG)).await else {
            panic!("a heartbeat lists the directors");
        };
        assert_eq!(all.len(), 3);
        let alive = vec![
            (name("dir-a"), SocketAddr::from((Ipv4Addr::LOCALHOST, 4451))),
            (name("dir-c"), SocketAddr::from((Ipv4Addr::LOCALHOST, 4453))),
        ];
        r.until(
            beat("dir-a", 4451, LONG),
            RegistryResponse::Directors(alive.clone()),
        )
        .await;
        // A director that moved is listed at its new address.
        let moved = vec![
            (name("dir-a"), SocketAddr::from((Ipv4Addr::LOCALHOST, 5451))),
            alive[1].clone(),
        ];
        assert_eq!(
            r.execute(beat("dir-a", 5451, LONG)).await,
            RegistryResponse::Directors(moved)
        );
    });
}

#[test]
fn a_restarted_registry_fails_while_down_and_works_again() {
    let Some(server) = RedisServer::start(None) else {
        return;
    };
    let port = server.port;
    smol::block_on(async {
        let mut redis = RedisRegistry::new(&server.url(), "restart").expect("a URL");
        redis.set_timeout(Duration::from_secs(1));
        let claim = RegistryRequest::Claim {
            addr: v4(7),
            owner: name("dir-a"),
            lease: LONG,
        };
        assert_eq!(redis.execute(&claim).await, RegistryResponse::Claimed(true));
        drop(server);
        for _ in 0..2 {
            let down = redis.execute(&claim).await;
            assert!(
                matches!(down, RegistryResponse::Failed(_)),
                "while down: {down:?}"
            );
        }
        // Back, empty (it keeps nothing on disk): the same claim is granted again.
        let _server = RedisServer::start(Some(port)).expect("redis-server was there");
        let deadline = Instant::now() + BOUND;
        loop {
            match redis.execute(&claim).await {
                RegistryResponse::Claimed(true) => break,
                RegistryResponse::Failed(why) => {
                    assert!(Instant::now() < deadline, "still failing: {why}");
                    smol::Timer::after(Duration::from_millis(20)).await;
                }
                other => panic!("after the restart: {other:?}"),
            }
        }
    });
}

/// How long a failover of the store may take before the test fails.
const FAILOVER_BOUND: Duration = Duration::from_secs(30);

/// The answer of the server on loopback port `port` to `cmd`, or `None` while it gives none.
fn ask<T: ::redis::FromRedisValue>(port: u16, cmd: &::redis::Cmd) -> Option<T> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut con = client.get_connection().ok()?;
    cmd.query(&mut con).ok()
}

/// Waits, polling, until `done` holds, within `bound`.
fn wait_for(what: &str, bound: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + bound;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_registry_follows_the_master_through_a_sentinel_failover() {
    let Some(mut master) = RedisServer::start(None) else {
        return;
    };
    let replica = RedisServer::start_replica(master.port).expect("a replica");
    // The sentinel learns the replicas from the master's INFO, asked at once and then every
    // 10 s: started once the replica is attached, it knows it from the start.
    wait_for("the replica attached to its master", BOUND, || {
        ask::<String>(replica.port, ::redis::cmd("INFO").arg("replication"))
            .is_some_and(|info| info.contains("master_link_status:up"))
    });
    let sentinel = RedisServer::start_sentinel(master.port, "mymaster").expect("a sentinel");
    wait_for("the sentinel knows the replica", BOUND, || {
        ask::<Vec<std::collections::HashMap<String, String>>>(
            sentinel.port,
            ::redis::cmd("SENTINEL").arg("REPLICAS").arg("mymaster"),
        )
        .is_some_and(|replicas| {
            replicas.iter().any(|r| {
                r.get("flags").map(String::as_str) == Some("slave")
                    && r.get("master-link-status").map(String::as_str) == Some("ok")
            })
        })
    });

    smol::block_on(async {
        let url = format!("redis+sentinel://127.0.0.1:{}/mymaster", sentinel.port);
        let mut redis = RedisRegistry::new(&url, "sentinel").expect("a URL");
        let record = TunnelRecord {
            id: 0x5e,
            ipv4: Some(Ipv4Addr::new(10, 77, 0, 5)),
            ipv6: None,
            salt: [0x3c; SALT_LEN],
            owner: name("dir-a"),
        };
        let put = RegistryRequest::Put {
            record: record.clone(),
            lease: LONG,
        };
        let get = RegistryRequest::GetTunnel { id: record.id };
        let found = RegistryResponse::Tunnel(Some(record.clone()));
        assert_eq!(redis.execute(&put).await, RegistryResponse::Done);
        assert_eq!(redis.execute(&get).await, found);

        // Replication is asynchronous: the master dies once the replica has the record.
        let mut on_replica = RedisRegistry::new(&replica.url(), "sentinel").expect("a URL");
        let deadline = Instant::now() + BOUND;
        while on_replica.execute(&get).await != found {
            assert!(
                Instant::now() < deadline,
                "the replica never had the record"
            );
            smol::Timer::after(Duration::from_millis(20)).await;
        }

        master.kill();
        let killed = Instant::now();
        let mut failed = 0u32;
        loop {
            match redis.execute(&get).await {
                answer if answer == found => break,
                RegistryResponse::Failed(why) => {
                    failed += 1;
                    assert!(
                        killed.elapsed() < FAILOVER_BOUND,
                        "still failing {FAILOVER_BOUND:?} after the kill: {why}"
                    );
                    smol::Timer::after(Duration::from_millis(50)).await;
                }
                other => panic!("after the failover: {other:?}"),
            }
        }
        println!(
            "the registry failed for {:?} after its master was killed ({failed} requests failed)",
            killed.elapsed()
        );

        // It writes to the promoted replica. (Promoted, the replica closed the connections of
        // its clients: the one reading it fails once, then connects again.)
        let claim = RegistryRequest::Claim {
            addr: v4(55),
            owner: name("dir-a"),
            lease: LONG,
        };
        assert_eq!(redis.execute(&claim).await, RegistryResponse::Claimed(true));
        let get_address = RegistryRequest::GetAddress { addr: v4(55) };
        let held = RegistryResponse::Address(Some(AddressHolder {
            owner: name("dir-a"),
            tunnel: 0,
        }));
        assert_eq!(redis.execute(&get_address).await, held);
        let deadline = Instant::now() + BOUND;
        loop {
            match on_replica.execute(&get_address).await {
                RegistryResponse::Failed(why) => {
                    assert!(
                        Instant::now() < deadline,
                        "the replica never answered: {why}"
                    );
                    smol::Timer::after(Duration::from_millis(20)).await;
                }
                answer => {
                    assert_eq!(answer, held, "the promoted replica");
                    break;
                }
            }
        }
    });
}

/// Director `director` of the cluster whose files are in `dir`, with its registry at `url`,
/// on a UDP listener and a mesh listener at `mesh`.
async fn director(
    director: &str,
    dir: &std::path::Path,
    url: &str,
    mesh: SocketAddr,
) -> tscf_runtime_smol::ServerHandle {
    use tscf_core::cluster::ClusterConfig;
    use tscf_core::tls::{mesh_tls, MeshTlsConfig};
    use tscf_runtime_smol::{ClusterEndpoints, Server, ServerConfig, OS};

    let mut cluster = ClusterConfig::new(name(director), [0x5e; 32], mesh);
    cluster.heartbeat = Duration::from_millis(200);
    cluster.director_lease = Duration::from_secs(2);
    let mut config = ServerConfig {
        udp: vec!["127.0.0.1:0".parse().expect("an address")],
        mesh: vec![mesh],
        ..ServerConfig::default()
    };
    config.director.cluster = Some(cluster);
    let tls = MeshTlsConfig {
        ca: dir.join("ca.pem"),
        cert: dir.join(format!("{director}.pem")),
        key: dir.join(format!("{director}.key")),
    };
    let endpoints = ClusterEndpoints::new(
        RedisRegistry::new(url, "e2e").expect("a URL"),
        mesh_tls(&tls, OS).expect("mesh TLS"),
    );
    Server::start_cluster(config, endpoints)
        .await
        .expect("a director starts")
}

/// Waits until `done` holds, within the bound.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + BOUND;
    while !done() {
        assert!(Instant::now() < deadline, "never: {what}");
        smol::Timer::after(Duration::from_millis(20)).await;
    }
}

#[test]
fn directors_of_one_cluster_relay_between_their_clients_over_the_mesh() {
    use tscf_core::client::ServerEndpoint;
    use tscf_core::wire::Transport;
    use tscf_runtime_smol::{Tunnel, TunnelConfig};

    let Some(server) = RedisServer::start(None) else {
        return;
    };
    let dir = TempDir::new();
    write_cluster_files(&dir.0);
    smol::block_on(async {
        let mesh_a = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let mesh_b = SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()));
        let a = director("dir-a", &dir.0, &server.url(), mesh_a).await;
        let b = director("dir-b", &dir.0, &server.url(), mesh_b).await;
        assert_eq!(a.mesh_addrs(), [mesh_a]);
        eventually("the directors link", || {
            a.stats().director.cluster.mesh_links > 0 && b.stats().director.cluster.mesh_links > 0
        })
        .await;

        // One client on each director, peer tunneling off: their packets take the mesh.
        let client = |addr| {
            let mut config = TunnelConfig::new(vec![ServerEndpoint {
                addr,
                transport: Transport::UDP,
            }]);
            config.client.peer = None;
            config.connect_timeout = BOUND;
            Tunnel::connect(config)
        };
        let on_a = client(a.local_addrs().udp[0])
            .await
            .expect("a tunnel on dir-a");
        let on_b = client(b.local_addrs().udp[0])
            .await
            .expect("a tunnel on dir-b");
        let ip_a = on_a.internal_ipv4().expect("an address from dir-a");
        let ip_b = on_b.internal_ipv4().expect("an address from dir-b");
        assert_ne!(ip_a, ip_b, "the registry gave one address twice");

        let from = on_a.bind(5004).expect("a socket");
        let to = on_b.bind(5004).expect("a socket");
        let target = SocketAddr::from((ip_b, 5004));
        let mut buf = [0u8; 64];
        // The first packets may wait for dir-a to learn where ip_b lives: send until one
        // arrives, within the bound.
        let deadline = Instant::now() + BOUND;
        let (n, source) = loop {
            from.send_to(b"across the mesh", target)
                .await
                .expect("sent");
            let got =
                futures_lite::future::or(async { Some(to.recv_from(&mut buf).await) }, async {
                    smol::Timer::after(Duration::from_millis(100)).await;
                    None
                })
                .await;
            if let Some(got) = got {
                break got.expect("received");
            }
            assert!(Instant::now() < deadline, "nothing crossed the mesh");
        };
        assert_eq!(&buf[..n], b"across the mesh");
        assert_eq!(source, SocketAddr::from((ip_a, 5004)));
        assert!(a.stats().director.cluster.mesh_frames_out > 0);
        assert!(b.stats().director.cluster.mesh_frames_in > 0);
        let registry = a.stats().director.cluster;
        assert!(registry.registry_requests > 0 && registry.addresses_claimed > 0);
    });
}

#[test]
fn pipelined_requests_run_in_their_order() {
    let Some(server) = RedisServer::start(None) else {
        return;
    };
    let record = TunnelRecord {
        id: 0x30,
        ipv4: Some(Ipv4Addr::new(10, 77, 0, 30)),
        ipv6: None,
        salt: [3; SALT_LEN],
        owner: name("dir-a"),
    };
    let addr = v4(30);
    let claim = |owner: &str| RegistryRequest::Claim {
        addr,
        owner: name(owner),
        lease: LONG,
    };
    let remove = |owner: &str| RegistryRequest::Remove {
        id: record.id,
        addresses: vec![addr],
        owner: name(owner),
    };
    let get = RegistryRequest::GetTunnel { id: record.id };
    let requests = vec![
        claim("dir-a"),
        claim("dir-b"),
        RegistryRequest::Put {
            record: record.clone(),
            lease: LONG,
        },
        get.clone(),
        remove("dir-b"),
        get.clone(),
        remove("dir-a"),
        get.clone(),
        claim("dir-b"),
        RegistryRequest::GetAddress { addr },
    ];
    let mut memory = MemoryRegistry::new();
    let expected: Vec<RegistryResponse> = requests
        .iter()
        .map(|r| memory.execute(Instant::now(), r))
        .collect();
    let mut redis = RedisRegistry::new(&server.url(), "pipeline").expect("a URL");
    let answers = smol::block_on(redis.execute_all(&requests));
    assert_eq!(answers, expected);
    assert_eq!(answers[3], RegistryResponse::Tunnel(Some(record)));
}
