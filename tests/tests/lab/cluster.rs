//! The cluster lab: three `tscf server` processes, each on a public host of its own, sharing one
//! real `redis-server`, with clients behind NAT spread over them.
//!
//! ```text
//!   203.0.113.20 redis-server
//!   203.0.113.21 d1    203.0.113.22 d2    203.0.113.23 d3     (mesh: TLS on port 4450)
//!         site A (port-restricted NAT)   site B (port-restricted NAT)   site C …
//! ```
//!
//! The clients reach their directors over TLS: a director's death closes the connection at
//! once, and the client re-attaches to the next director of its list.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tscf_tests::lab::{public_addr, which, Lab, Media, Nat, Proc};

use super::{args, lab, MEDIA_INTERVAL};

const REDIS_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 20);
const REDIS_PORT: u16 = 6379;
/// Director `k` (0, 1, 2) is `d{k+1}` at 203.0.113.(21 + k).
const DIRECTORS: usize = 3;
const TLS_PORT: u16 = 4443;
const MESH_PORT: u16 = 4450;
/// The admin endpoint, on each director's own loopback.
const ADMIN: &str = "127.0.0.1:4449";
/// The cluster secret of the lab (64 hex digits).
const SECRET: &str = "6c6162206f6e6c793a206e6f742061207365637265742c206a75737420746573";

fn director_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 21 + k as u8)
}

/// A cluster in a lab: the registry, the directors (`None` once killed), their namespaces.
struct Cluster {
    redis: Option<Proc>,
    redis_ns: String,
    directors: Vec<Option<Proc>>,
    namespaces: Vec<String>,
    tscf: PathBuf,
}

impl Cluster {
    fn start(lab: &mut Lab, tscf: &Path) -> Self {
        certificates(lab.dir());
        let redis_ns = lab.add_public_host(REDIS_IP);
        let redis = Some(start_redis(lab, &redis_ns));
        let namespaces: Vec<String> = (0..DIRECTORS)
            .map(|k| lab.add_public_host(director_ip(k)))
            .collect();
        let mut cluster = Cluster {
            redis,
            redis_ns,
            directors: Vec::new(),
            namespaces,
            tscf: tscf.to_owned(),
        };
        for k in 0..DIRECTORS {
            let d = cluster.start_director(lab, k);
            cluster.directors.push(Some(d));
        }
        cluster
    }

    fn start_director(&self, lab: &mut Lab, k: usize) -> Proc {
        let dir = lab.dir().to_owned();
        let ip = director_ip(k);
        let name = format!("d{}", k + 1);
        let config = dir.join(format!("{name}.toml"));
        let file = |f: &str| dir.join(f).to_string_lossy().into_owned();
        std::fs::write(
            &config,
            format!(
                "udp = [\"{ip}:4440\"]\ntcp = []\ntls = [\"{ip}:{TLS_PORT}\"]\nquic = []\n\
                 dtls = []\nadmin = \"{ADMIN}\"\nauth_tokens = [\"{}\"]\nallow_plain = true\n\
                 [cluster]\nname = \"{name}\"\nredis = \"redis://{REDIS_IP}:{REDIS_PORT}/\"\n\
                 secret = \"{SECRET}\"\nmesh = \"{ip}:{MESH_PORT}\"\nca = \"{}\"\n\
                 cert = \"{}\"\nkey = \"{}\"\nheartbeat_ms = 500\ndirector_lease_ms = 1500\n",
                tscf_tests::lab::TOKEN,
                file("ca.pem"),
                file(&format!("{name}.pem")),
                file(&format!("{name}.key")),
            ),
        )
        .unwrap();
        let ns = self.namespaces[k].clone();
        let mut d = lab.spawn(
            &ns,
            &self.tscf,
            &args(&["server", "--config", config.to_str().unwrap()]),
        );
        if d.wait_for_text(&format!("tls {ip}:{TLS_PORT}"), Duration::from_secs(10))
            .is_none()
        {
            panic!("director {name} did not start\n{}", d.transcript());
        }
        d
    }

    /// The TLS addresses of the directors, `home` first, then the others in order.
    fn servers_from(&self, home: usize) -> Vec<String> {
        (0..DIRECTORS)
            .map(|k| (home + k) % DIRECTORS)
            .map(|k| public_addr(director_ip(k), TLS_PORT).to_string())
            .collect()
    }

    /// `tscf status --json` of director `k`.
    fn status(&self, lab: &Lab, k: usize) -> serde_json::Value {
        let tscf = self.tscf.to_str().unwrap();
        let out = lab.run(
            &self.namespaces[k],
            &[tscf, "status", "--admin", ADMIN, "--json"],
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn transcript(&self) -> String {
        let mut out = String::new();
        for d in self.directors.iter().flatten() {
            out.push_str(&d.transcript());
        }
        if let Some(r) = &self.redis {
            out.push_str(&r.transcript());
        }
        out
    }
}

/// A cluster CA and a certificate for each director (SAN: its name), with openssl.
fn certificates(dir: &Path) {
    let openssl = |a: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(a)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| panic!("openssl: {e}"));
        assert!(
            out.status.success(),
            "openssl {a:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=tscf lab cluster",
    ]);
    for k in 1..=DIRECTORS {
        let name = format!("d{k}");
        let (key, csr, pem) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        let subj = format!("/CN={name}");
        openssl(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ]);
        let ext = format!("{name}.ext");
        std::fs::write(dir.join(&ext), format!("subjectAltName=DNS:{name}\n")).unwrap();
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    }
}

fn start_redis(lab: &mut Lab, ns: &str) -> Proc {
    let redis = which("redis-server")
        .unwrap_or_else(|| panic!("`redis-server` not found (scripts/lab-deps installs it)"));
    let bind = REDIS_IP.to_string();
    let port = REDIS_PORT.to_string();
    let mut proc = lab.spawn(
        ns,
        &redis,
        &args(&[
            "--bind",
            &bind,
            "--port",
            &port,
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]),
    );
    if proc
        .wait_for_text("Ready to accept connections", Duration::from_secs(10))
        .is_none()
    {
        panic!("redis-server did not start\n{}", proc.transcript());
    }
    proc
}

/// A client on site host `ns` with the directors `servers` (its home first), and with
/// `extra` arguments; its process and the tunnel id and internal IPv4 address of its
/// `connected` event.
fn start_client(
    lab: &mut Lab,
    tscf: &Path,
    ns: &str,
    servers: &[String],
    extra: &[&str],
) -> (Proc, (u64, Ipv4Addr)) {
    let mut list = args(&["client", "--transport", "tls", "--insecure", "--json"]);
    for s in servers {
        list.extend(args(&["--server", s]));
    }
    list.extend(args(&["--token", tscf_tests::lab::TOKEN]));
    list.extend(args(extra));
    let mut client = lab.spawn(ns, tscf, &list);
    let Some(connected) = client.wait_for("connected", Duration::from_secs(15)) else {
        panic!(
            "the client in {ns} did not connect\n{}",
            client.transcript()
        );
    };
    let tunnel = tunnel_of(&connected.json().unwrap());
    (client, tunnel)
}

/// The tunnel id and internal IPv4 address of a `connected` or `reattached` event.
fn tunnel_of(event: &serde_json::Value) -> (u64, Ipv4Addr) {
    let id = event["tunnel_id"].as_u64().unwrap();
    let ipv4 = event["ipv4"].as_str().unwrap();
    (id, ipv4.split('/').next().unwrap().parse().unwrap())
}

/// Caller B forwards a local port to A's echo port (every client echoes on inner UDP port 7):
/// the media B sends comes back from A, so its arrivals show the path both ways.
fn start_caller(
    lab: &mut Lab,
    tscf: &Path,
    ns: &str,
    servers: &[String],
    callee: Ipv4Addr,
    extra: &[&str],
) -> (Proc, (u64, Ipv4Addr), Media) {
    let forward = format!("127.0.0.1:0={callee}:{ECHO_PORT}");
    let mut all = vec!["--forward", &forward];
    all.extend_from_slice(extra);
    let (mut client, tunnel) = start_client(lab, tscf, ns, servers, &all);
    let Some(line) = client.wait_for("forward", Duration::from_secs(15)) else {
        panic!(
            "the client in {ns} did not forward\n{}",
            client.transcript()
        );
    };
    let local = line.json().unwrap()["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let media = Media::start(ns, local, MEDIA_INTERVAL).unwrap();
    (client, tunnel, media)
}

/// The inner UDP echo port of every `tscf client`.
const ECHO_PORT: u16 = 7;

#[test]
fn cluster_relays_across_directors_and_survives_a_director_death() {
    let Some((mut lab, tscf, mut cluster, [a_ns, b_ns])) = cluster_with_two_sites() else {
        return;
    };

    // A is at home on d1, B on d2: every packet between them crosses the mesh.
    let (mut a, a_tunnel) = start_client(&mut lab, &tscf, &a_ns, &cluster.servers_from(0), &[]);
    let (b, _, media) = start_caller(
        &mut lab,
        &tscf,
        &b_ns,
        &cluster.servers_from(1),
        a_tunnel.1,
        &[],
    );
    let transcript = |a: &Proc, b: &Proc, c: &Cluster| {
        format!("{}{}{}", a.transcript(), b.transcript(), c.transcript())
    };
    assert!(
        media
            .wait_received_after(Instant::now(), 25, Duration::from_secs(10))
            .is_some(),
        "no echo across the mesh\n{}",
        transcript(&a, &b, &cluster)
    );
    let mesh = cluster.status(&lab, 0)["director"]["cluster"].clone();
    assert!(
        mesh["mesh_frames_out"].as_u64().unwrap_or(0) > 0,
        "d1 sent nothing over the mesh: {mesh}"
    );

    // d1 dies as a crash would: A re-attaches to d2, keeping its tunnel and address.
    let d1 = cluster.directors[0].take().unwrap();
    let killed = Instant::now();
    lab.kill(&d1);
    let Some(reattached) = a.wait_for("reattached", Duration::from_secs(15)) else {
        panic!("A did not re-attach\n{}", transcript(&a, &b, &cluster));
    };
    assert_eq!(
        tunnel_of(&reattached.json().unwrap()),
        a_tunnel,
        "A's tunnel changed"
    );
    assert!(
        media
            .wait_received_after(reattached.at, 25, Duration::from_secs(10))
            .is_some(),
        "no echo after the failover\n{}",
        transcript(&a, &b, &cluster)
    );
    let silent = media.longest_gap_after(killed);
    println!(
        "cluster lab: director killed, A re-attached after {} ms, relay silent for {} ms \
         (goal: under 2000 ms)",
        (reattached.at - killed).as_millis(),
        silent.as_millis()
    );
    // The goal is 2 s; the bound leaves room for a loaded machine.
    assert!(
        silent < Duration::from_secs(5),
        "relay silent for {silent:?}\n{}",
        transcript(&a, &b, &cluster)
    );

    // The registry restarts empty: the directors go on relaying what they know, and put it
    // back once it is there again.
    let redis = cluster.redis.take().unwrap();
    lab.kill(&redis);
    let down = Instant::now();
    assert!(
        media
            .wait_received_after(down + Duration::from_secs(2), 25, Duration::from_secs(10))
            .is_some(),
        "relaying stopped with the registry down\n{}",
        transcript(&a, &b, &cluster)
    );
    let ns = cluster.redis_ns.clone();
    cluster.redis = Some(start_redis(&mut lab, &ns));
    // A new client on d3 reaches A, whose record d2 must have put back.
    let site_c = lab.add_site(Nat::PortRestricted, 1);
    let c_ns = site_c.hosts[0].0.clone();
    let (c, _, media_c) = start_caller(
        &mut lab,
        &tscf,
        &c_ns,
        &cluster.servers_from(2),
        a_tunnel.1,
        &[],
    );
    assert!(
        media_c
            .wait_received_after(Instant::now(), 25, Duration::from_secs(15))
            .is_some(),
        "C on d3 cannot reach A after the registry's restart\n{}{}",
        c.transcript(),
        transcript(&a, &b, &cluster)
    );
}

#[test]
fn cluster_peer_tunnel_outlives_its_director() {
    let Some((mut lab, tscf, mut cluster, [a_ns, b_ns])) = cluster_with_two_sites() else {
        return;
    };
    // A fails over to d3, so that after the failover A and B are still on two directors.
    let a_servers = [0, 2, 1].map(|k| public_addr(director_ip(k), TLS_PORT).to_string());
    let (mut a, a_tunnel) = start_client(&mut lab, &tscf, &a_ns, &a_servers, &["--peer"]);
    let (mut b, _, media) = start_caller(
        &mut lab,
        &tscf,
        &b_ns,
        &cluster.servers_from(1),
        a_tunnel.1,
        &["--peer"],
    );
    let transcript = |a: &Proc, b: &Proc, c: &Cluster| {
        format!("{}{}{}", a.transcript(), b.transcript(), c.transcript())
    };
    // Introduced across directors: B's d2 asks A's d1 over the mesh.
    let Some(up) = b.wait_for("peer_tunnel_up", Duration::from_secs(15)) else {
        panic!(
            "no peer tunnel across directors\n{}",
            transcript(&a, &b, &cluster)
        );
    };
    assert!(media
        .wait_received_after(up.at, 25, Duration::from_secs(10))
        .is_some());

    let d1 = cluster.directors[0].take().unwrap();
    let killed = Instant::now();
    lab.kill(&d1);
    let Some(reattached) = a.wait_for("reattached", Duration::from_secs(15)) else {
        panic!("A did not re-attach\n{}", transcript(&a, &b, &cluster));
    };
    let settled = reattached.at + Duration::from_secs(2);
    assert!(media
        .wait_received_after(settled, 25, Duration::from_secs(10))
        .is_some());
    let gap = media.longest_gap_after(killed);
    println!(
        "cluster lab: peer tunnel across a director's death: longest silence {} ms",
        gap.as_millis()
    );
    for (who, p) in [("A", &mut a), ("B", &mut b)] {
        p.drain();
        let down = p
            .seen()
            .iter()
            .any(|e| e.at > killed && e.name().as_deref() == Some("peer_tunnel_down"));
        assert!(!down, "{who}'s peer tunnel went down\n{}", p.transcript());
    }
    // The media never waited for the failover: a 20 ms stream with no gap near a re-attach.
    assert!(
        gap < Duration::from_millis(500),
        "the peer tunnel was silent for {gap:?}\n{}",
        transcript(&a, &b, &cluster)
    );

    // The peer service works again for A at its new director: C, on d2, is introduced to A,
    // on d3, across the mesh.
    let site_c = lab.add_site(Nat::PortRestricted, 1);
    let c_ns = site_c.hosts[0].0.clone();
    let (mut c, _, _media_c) = start_caller(
        &mut lab,
        &tscf,
        &c_ns,
        &cluster.servers_from(1),
        a_tunnel.1,
        &["--peer"],
    );
    if c.wait_for("peer_tunnel_up", Duration::from_secs(15))
        .is_none()
    {
        panic!(
            "no peer tunnel to A after its failover\n{}{}",
            c.transcript(),
            transcript(&a, &b, &cluster)
        );
    }
}

/// A lab with a cluster and two client sites behind port-restricted NATs (one host each):
/// the lab, `tscf`, the cluster and the two hosts' namespaces.
fn cluster_with_two_sites() -> Option<(Lab, PathBuf, Cluster, [String; 2])> {
    let (mut lab, tscf) = cluster_lab()?;
    let sites = [0, 1].map(|_| lab.add_site(Nat::PortRestricted, 1).hosts[0].0.clone());
    let cluster = Cluster::start(&mut lab, &tscf);
    Some((lab, tscf, cluster, sites))
}

/// The lab, with what a cluster needs besides.
fn cluster_lab() -> Option<(Lab, PathBuf)> {
    let found = lab()?;
    for program in ["redis-server", "openssl"] {
        if which(program).is_none() {
            panic!("`{program}` not found (scripts/lab-deps installs it)");
        }
    }
    Some(found)
}
