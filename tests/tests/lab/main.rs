//! The NAT lab: the real `tscf` server and clients in network namespaces behind nftables NAT
//! routers, with coturn as an outside STUN server. Needs root, `ip`, `nft`, `conntrack` and
//! `turnserver` (`scripts/lab-deps`); without them it says why and passes, unless `CI=true`.
//! `scripts/lab` runs it alone with the matrix visible.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod cluster;
mod nat;
mod tun;

use tscf_tests::lab::{public_addr, tscf_binary, Lab, Media, Nat, Proc, Site, SERVER_IP, STUN_IP};

/// The server's UDP port (tscf and its STUN responder).
const SERVER_PORT: u16 = 4440;
/// The server's TLS port.
const SERVER_TLS_PORT: u16 = 4443;
/// coturn's port.
const STUN_PORT: u16 = 3478;
/// The server's admin endpoint, on the public namespace's loopback.
const ADMIN: &str = "127.0.0.1:4449";
/// How long a matrix cell watches the media once the path is settled.
const WINDOW: Duration = Duration::from_secs(1);
/// The inner UDP port the media uses on both clients.
const MEDIA_PORT: u16 = 5004;
/// One media datagram every 20 ms, both ways.
const MEDIA_INTERVAL: Duration = Duration::from_millis(20);
/// The peer tunnel's silence timeout (`PeerConfig::silence_timeout`, default 1.5 s).
const SILENCE: Duration = Duration::from_millis(1500);

/// Peer transports the matrix covers: one column each. A transport is the extra `tscf client`
/// arguments that select it.
const PEER_TRANSPORTS: &[(&str, &[&str])] = &[
    ("udp", &["--peer-transport", "udp"]),
    ("quic", &["--peer-transport", "quic"]),
    ("dtls", &["--peer-transport", "dtls"]),
];

/// The lab, or `None` (after saying why) where namespaces cannot be made or a program is
/// missing; under `CI=true` that is a failure instead.
fn lab() -> Option<(Lab, PathBuf)> {
    let skip = |why: &dyn std::fmt::Display| {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("the NAT lab cannot run (CI=true): {why}");
        }
        // Straight to standard error, past the test harness's capture, so that a skip shows.
        let _ = writeln!(std::io::stderr(), "NAT lab skipped: {why}");
    };
    if tscf_tests::lab::turnserver().is_none() {
        skip(&"`turnserver` not found (scripts/lab-deps installs coturn)");
        return None;
    }
    let lab = match Lab::new() {
        Ok(lab) => lab,
        Err(why) => {
            skip(&why);
            return None;
        }
    };
    let tscf = tscf_binary().unwrap_or_else(|e| panic!("{e}"));
    Some((lab, tscf))
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| (*s).to_owned()).collect()
}

/// Starts `tscf server` in the public namespace on [`SERVER_IP`] (UDP, and TLS with a
/// self-signed certificate), admitting by token; returns its UDP address.
fn start_server(lab: &mut Lab, tscf: &Path) -> (Proc, SocketAddr) {
    let addr = public_addr(SERVER_IP, SERVER_PORT);
    let tls = public_addr(SERVER_IP, SERVER_TLS_PORT);
    let config = lab.dir().join("server.toml");
    std::fs::write(
        &config,
        format!(
            "udp = [\"{addr}\"]\ntcp = []\ntls = [\"{tls}\"]\nquic = []\ndtls = []\n\
             admin = \"{ADMIN}\"\nauth_tokens = [\"{}\"]\nallow_plain = true\n",
            tscf_tests::lab::TOKEN
        ),
    )
    .unwrap();
    let ns = lab.public().to_owned();
    let mut server = lab.spawn(
        &ns,
        tscf,
        &args(&["server", "--config", config.to_str().unwrap()]),
    );
    if server
        .wait_for_text(&format!("udp {addr}"), Duration::from_secs(10))
        .is_none()
    {
        panic!("the server did not start\n{}", server.transcript());
    }
    (server, addr)
}

/// Data frames the server has relayed so far (`tscf status`).
fn relayed(lab: &Lab, tscf: &Path) -> u64 {
    let out = lab.run(
        lab.public(),
        &[tscf.to_str().unwrap(), "status", "--admin", ADMIN, "--json"],
    );
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    status["director"]["frames_relayed"].as_u64().unwrap()
}

/// Starts coturn as a plain STUN server in the public namespace on [`STUN_IP`].
fn start_coturn(lab: &mut Lab) -> (Proc, SocketAddr) {
    let turnserver = tscf_tests::lab::turnserver()
        .unwrap_or_else(|| panic!("`turnserver` not found (scripts/lab-deps installs coturn)"));
    let addr = public_addr(STUN_IP, STUN_PORT);
    let ns = lab.public().to_owned();
    let listening = format!("--listening-ip={STUN_IP}");
    let port = format!("--listening-port={STUN_PORT}");
    let proc = lab.spawn(
        &ns,
        &turnserver,
        &args(&[
            "-n",
            &listening,
            &port,
            "--stun-only",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            "--log-file=stdout",
            "--simple-log",
        ]),
    );
    (proc, addr)
}

/// A `tscf client --json --peer` forwarding a local port to `peer`'s media port; its process
/// and the local address of the forward.
fn start_client(
    lab: &mut Lab,
    tscf: &Path,
    ns: &str,
    server: SocketAddr,
    peer: Ipv4Addr,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    let server = server.to_string();
    let forward = format!("127.0.0.1:0={peer}:{MEDIA_PORT}");
    let mut list = args(&[
        "client",
        "--server",
        &server,
        "--token",
        tscf_tests::lab::TOKEN,
        "--json",
        "--peer",
        "--forward",
        &forward,
    ]);
    list.extend(args(extra));
    let mut client = lab.spawn(ns, tscf, &list);
    let Some(line) = client.wait_for("forward", Duration::from_secs(15)) else {
        panic!("the client in {ns} did not start\n{}", client.transcript());
    };
    let local = line.json().unwrap()["local"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    (client, local)
}

/// The first two clients of a fresh server get these internal addresses.
const FIRST: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const SECOND: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

/// Two clients calling each other through a fresh server, media flowing both ways.
struct Call {
    server: Proc,
    a: Proc,
    b: Proc,
    media_a: Media,
    media_b: Media,
    started: Instant,
}

impl Call {
    /// Clients on the server's UDP listener, offering the peer `transport`.
    fn start(lab: &mut Lab, tscf: &Path, a_ns: &str, b_ns: &str, transport: &[&str]) -> Self {
        Self::start_on(lab, tscf, a_ns, b_ns, false, transport)
    }

    /// [`Call::start`], the clients on the server's TLS listener when `tls`. Over TLS they
    /// have no STUN server of their own: NAT discovery asks the responder the server
    /// announces (STUN Port).
    fn start_on(
        lab: &mut Lab,
        tscf: &Path,
        a_ns: &str,
        b_ns: &str,
        tls: bool,
        transport: &[&str],
    ) -> Self {
        let (server, mut addr) = start_server(lab, tscf);
        let mut extra = transport.to_vec();
        if tls {
            addr = public_addr(SERVER_IP, SERVER_TLS_PORT);
            extra.extend(["--transport", "tls", "--insecure"]);
        }
        let (a, local_a) = start_client(lab, tscf, a_ns, addr, SECOND, &extra);
        let (b, local_b) = start_client(lab, tscf, b_ns, addr, FIRST, &extra);
        let started = Instant::now();
        let media_a = Media::start(a_ns, local_a, MEDIA_INTERVAL).unwrap();
        let media_b = Media::start(b_ns, local_b, MEDIA_INTERVAL).unwrap();
        Call {
            server,
            a,
            b,
            media_a,
            media_b,
            started,
        }
    }

    fn transcript(&self) -> String {
        format!(
            "{}{}{}media a {:?}, media b {:?}",
            self.a.transcript(),
            self.b.transcript(),
            self.server.transcript(),
            self.media_a.stats(),
            self.media_b.stats()
        )
    }

    /// Waits until both ends received media sent after `t`.
    fn media_flows_after(&self, t: Instant, timeout: Duration) -> bool {
        self.media_a.wait_received_after(t, 5, timeout).is_some()
            && self.media_b.wait_received_after(t, 5, timeout).is_some()
    }
}

/// A matrix row: its label, the two clients' namespaces and LAN addresses, the address the
/// peer tunnel must reach B at, and what is expected.
type Cell = (
    &'static str,
    (String, Ipv4Addr),
    (String, Ipv4Addr),
    Ipv4Addr,
    Expect,
);

/// What a matrix cell expects.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Expect {
    /// A peer tunnel to the other client's LAN address.
    Host,
    /// A peer tunnel to the other site's public address (hole punching).
    Punched,
    /// No peer tunnel; media over the relay.
    Relay,
}

#[test]
fn nat_matrix() {
    let Some((mut lab, tscf)) = lab() else { return };
    let lan = lab.add_site(Nat::PortRestricted, 2);
    let cone_a = lab.add_site(Nat::PortRestricted, 1);
    let cone_b = lab.add_site(Nat::PortRestricted, 1);
    let sym_a = lab.add_site(Nat::Symmetric, 1);
    let sym_b = lab.add_site(Nat::Symmetric, 1);
    let host = |s: &Site, i: usize| s.hosts[i].clone();
    let cells: Vec<Cell> = vec![
        (
            "same LAN, one NAT",
            host(&lan, 0),
            host(&lan, 1),
            lan.hosts[1].1,
            Expect::Host,
        ),
        (
            "port-restricted <-> port-restricted",
            host(&cone_a, 0),
            host(&cone_b, 0),
            cone_b.public_ip,
            Expect::Punched,
        ),
        (
            "port-restricted <-> symmetric",
            host(&cone_a, 0),
            host(&sym_b, 0),
            sym_b.public_ip,
            Expect::Relay,
        ),
        (
            "symmetric <-> symmetric",
            host(&sym_a, 0),
            host(&sym_b, 0),
            sym_b.public_ip,
            Expect::Relay,
        ),
    ];
    let mut rows = Vec::new();
    for (label, (a_ns, _), (b_ns, _), b_path_ip, expect) in cells {
        for (transport, transport_args) in PEER_TRANSPORTS {
            let mut call = Call::start(&mut lab, &tscf, &a_ns, &b_ns, transport_args);
            let cell = match expect {
                Expect::Host | Expect::Punched => {
                    let Some(up) = call.a.wait_for("peer_tunnel_up", Duration::from_secs(15))
                    else {
                        panic!("{label}/{transport}: no peer tunnel\n{}", call.transcript());
                    };
                    let up_json = up.json().unwrap();
                    let path: SocketAddr = up_json["path"].as_str().unwrap().parse().unwrap();
                    assert_eq!(
                        up_json["transport"]
                            .as_str()
                            .map(str::to_lowercase)
                            .as_deref(),
                        Some(*transport),
                        "{label}/{transport}: over another transport\n{}",
                        call.transcript()
                    );
                    assert_eq!(
                        path.ip(),
                        b_path_ip,
                        "{label}/{transport}: {expect:?} expected\n{}",
                        call.transcript()
                    );
                    assert!(
                        call.b
                            .wait_for("peer_tunnel_up", Duration::from_secs(5))
                            .is_some(),
                        "{label}/{transport}: B saw no peer tunnel\n{}",
                        call.transcript()
                    );
                    assert!(
                        call.media_flows_after(up.at, Duration::from_secs(5)),
                        "{label}/{transport}: no media on the peer tunnel\n{}",
                        call.transcript()
                    );
                    let kind = if expect == Expect::Host {
                        "host"
                    } else {
                        "punched"
                    };
                    (
                        format!("{kind} {path}"),
                        format!(
                            "{:.1} ms (up {:.0} ms after the media started)",
                            up_json["setup_ms"].as_f64().unwrap(),
                            (up.at - call.started).as_secs_f64() * 1e3
                        ),
                    )
                }
                Expect::Relay => {
                    // The attempt fails (the establishment timeout is 3 s) while media keeps
                    // flowing over the relay.
                    let Some(down) = call.a.wait_for("peer_tunnel_down", Duration::from_secs(10))
                    else {
                        panic!(
                            "{label}/{transport}: no failed attempt\n{}",
                            call.transcript()
                        );
                    };
                    assert!(
                        call.media_flows_after(down.at, Duration::from_secs(3)),
                        "{label}/{transport}: media stopped\n{}",
                        call.transcript()
                    );
                    assert!(down.json().unwrap()["path"].is_null(), "no tunnel was up");
                    let reason = down.json().unwrap()["reason"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned();
                    (
                        "relay".to_owned(),
                        format!(
                            "attempt failed after {:.1} s: {reason}",
                            (down.at - call.started).as_secs_f64()
                        ),
                    )
                }
            };
            // Watch the settled path for a while: media arrives both ways, and the server
            // relays it (relay) or nothing of it (peer tunnel).
            let (frames_before, t0) = (relayed(&lab, &tscf), Instant::now());
            std::thread::sleep(WINDOW);
            let relayed_frames = relayed(&lab, &tscf) - frames_before;
            let (got_a, got_b) = (
                call.media_a.received_after(t0),
                call.media_b.received_after(t0),
            );
            let sent = (WINDOW.as_millis() / MEDIA_INTERVAL.as_millis()) as usize;
            assert!(
                got_a > sent / 2 && got_b > sent / 2,
                "{label}/{transport}: media received {got_a}/{got_b} of about {sent}\n{}",
                call.transcript()
            );
            match expect {
                // The two counts are read a few milliseconds apart: allow a frame or two.
                Expect::Relay => assert!(
                    relayed_frames as usize >= (got_a + got_b) * 9 / 10,
                    "{label}/{transport}: {relayed_frames} relayed, {got_a}+{got_b} received"
                ),
                _ => assert!(
                    (relayed_frames as usize) < (got_a + got_b) / 10,
                    "{label}/{transport}: {relayed_frames} relayed on a peer tunnel"
                ),
            }
            call.a.drain();
            call.b.drain();
            let seen_up = |p: &Proc| p.transcript().contains("\"peer_tunnel_up\"");
            if expect == Expect::Relay {
                assert!(
                    !seen_up(&call.a) && !seen_up(&call.b),
                    "{label}/{transport}: a peer tunnel came up\n{}",
                    call.transcript()
                );
            }
            rows.push((
                label,
                *transport,
                cell.0,
                cell.1,
                format!("{got_a}/{got_b}, {relayed_frames} relayed"),
            ));
            let Call { server, a, b, .. } = call;
            for p in [&a, &b, &server] {
                lab.terminate(p);
            }
        }
    }
    println!(
        "\nNAT lab matrix: path and setup time per NAT pair and peer transport; media \
         received in {} s at a/b (about {} each) and data frames the server relayed meanwhile",
        WINDOW.as_secs(),
        WINDOW.as_millis() / MEDIA_INTERVAL.as_millis()
    );
    let header = ["NAT pair", "peer", "path", "setup", "media"].map(String::from);
    let rows: Vec<[String; 5]> = rows
        .into_iter()
        .map(|(label, transport, path, setup, media)| {
            [label.to_owned(), transport.to_owned(), path, setup, media]
        })
        .collect();
    // Each column as wide as its widest cell, two spaces apart.
    let widths: Vec<usize> = (0..5)
        .map(|c| {
            rows.iter()
                .chain([&header])
                .map(|r| r[c].len())
                .max()
                .unwrap_or(0)
                + 2
        })
        .collect();
    for row in [&header].into_iter().chain(&rows) {
        let line: String = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", line.trim_end());
    }
}

/// Clients that reach the server over TLS name no STUN server: the responder the server
/// announces on its UDP port (STUN Port) tells each its NAT's mapping, and with that they punch
/// through two port-restricted NATs as UDP clients do. Without the announcement they would
/// offer host candidates only and stay on the relay.
#[test]
fn clients_over_tls_punch_through_with_the_stun_responder_the_server_announces() {
    let Some((mut lab, tscf)) = lab() else { return };
    let cone_a = lab.add_site(Nat::PortRestricted, 1);
    let cone_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (cone_a.hosts[0].0.clone(), cone_b.hosts[0].0.clone());
    let mut call = Call::start_on(&mut lab, &tscf, &a_ns, &b_ns, true, &[]);
    for (name, site) in [("a", &cone_a), ("b", &cone_b)] {
        let p = if name == "a" {
            &mut call.a
        } else {
            &mut call.b
        };
        let Some(nat) = p.wait_for("nat_discovered", Duration::from_secs(10)) else {
            panic!("{name}: no NAT discovery\n{}", call.transcript());
        };
        let public = nat.json().unwrap()["public"].as_str().map(str::to_owned);
        let public: Option<SocketAddr> = public.and_then(|p| p.parse().ok());
        assert_eq!(
            public.map(|p| p.ip()),
            Some(std::net::IpAddr::V4(site.public_ip)),
            "{name}: the NAT's mapping\n{}",
            call.transcript()
        );
    }
    let Some(up) = call.a.wait_for("peer_tunnel_up", Duration::from_secs(15)) else {
        panic!("over TLS: no peer tunnel\n{}", call.transcript());
    };
    let up_json = up.json().unwrap();
    let path: SocketAddr = up_json["path"].as_str().unwrap().parse().unwrap();
    assert_eq!(
        path.ip(),
        cone_b.public_ip,
        "punched\n{}",
        call.transcript()
    );
    assert!(
        call.media_flows_after(up.at, Duration::from_secs(5)),
        "no media on the peer tunnel\n{}",
        call.transcript()
    );
    println!(
        "clients over TLS, port-restricted <-> port-restricted: punched {path}, set up in \
         {:.1} ms",
        up_json["setup_ms"].as_f64().unwrap()
    );
    let Call { server, a, b, .. } = call;
    for p in [&a, &b, &server] {
        lab.terminate(p);
    }
}

/// `tscf netcheck` in a client namespace against the server's responder and coturn.
fn netcheck(lab: &Lab, tscf: &Path, ns: &str, servers: &[&str]) -> serde_json::Value {
    let tscf = tscf.to_str().unwrap();
    let mut list = vec![tscf, "netcheck", "--json"];
    list.extend_from_slice(servers);
    let out = lab.run(ns, &list);
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn ip_of(v: &serde_json::Value) -> Ipv4Addr {
    let addr: SocketAddr = v
        .as_str()
        .unwrap_or_else(|| panic!("no address: {v}"))
        .parse()
        .unwrap();
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        other => panic!("{other} is not IPv4"),
    }
}

#[test]
fn stun_interop_with_coturn_and_netcheck_verdicts() {
    let Some((mut lab, tscf)) = lab() else { return };
    let cone = lab.add_site(Nat::PortRestricted, 1);
    let sym = lab.add_site(Nat::Symmetric, 1);
    let (server, director) = start_server(&mut lab, &tscf);
    let (coturn, stun) = start_coturn(&mut lab);
    let (director, stun) = (director.to_string(), stun.to_string());
    // coturn prints nothing reliable when its socket is ready: ask until it answers.
    let deadline = Instant::now() + Duration::from_secs(10);
    let cone_ns = cone.hosts[0].0.clone();
    loop {
        let report = netcheck(&lab, &tscf, &cone_ns, &["--stun", &stun]);
        if !report["public"].is_null() {
            // coturn sees the NAT's mapping: the router's public address, and with
            // masquerade keeping ports, the socket's own port.
            let public: SocketAddr = report["public"].as_str().unwrap().parse().unwrap();
            let host: SocketAddr = report["host"].as_str().unwrap().parse().unwrap();
            assert_eq!(public.ip(), cone.public_ip, "{report}");
            assert_eq!(public.port(), host.port(), "{report}");
            assert_eq!(host.ip(), cone.hosts[0].1, "{report}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "coturn never answered\n{}",
            coturn.transcript()
        );
    }
    let both = ["--server", director.as_str(), "--stun", stun.as_str()];
    let report = netcheck(&lab, &tscf, &cone_ns, &both);
    println!("netcheck behind {}: {report}", cone.nat);
    assert_eq!(ip_of(&report["public"]), cone.public_ip);
    assert_eq!(report["mapping_varies_by_destination"], false, "{report}");
    assert_eq!(report["behind_nat"], true, "{report}");
    assert_eq!(report["host_usable"], true, "{report}");
    for s in report["servers"].as_array().unwrap() {
        assert_eq!(s["mapped"], report["public"], "{report}");
    }
    let sym_ns = sym.hosts[0].0.clone();
    let report = netcheck(&lab, &tscf, &sym_ns, &both);
    println!("netcheck behind {}: {report}", sym.nat);
    assert_eq!(ip_of(&report["public"]), sym.public_ip);
    assert_eq!(report["mapping_varies_by_destination"], true, "{report}");
    let mapped: Vec<_> = report["servers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["mapped"].clone())
        .collect();
    assert_ne!(mapped[0], mapped[1], "{report}");
    assert_eq!(ip_of(&mapped[0]), sym.public_ip);
    assert_eq!(ip_of(&mapped[1]), sym.public_ip);

    // The client's own NAT discovery with the STUN servers it is given.
    let server_addr: SocketAddr = director.parse().unwrap();
    for (site, varies) in [(&cone, false), (&sym, true)] {
        let ns = site.hosts[0].0.clone();
        let (mut client, _) = start_client(
            &mut lab,
            &tscf,
            &ns,
            server_addr,
            SECOND,
            &["--stun", &stun, "--stun", &director],
        );
        let Some(found) = client.wait_for("nat_discovered", Duration::from_secs(10)) else {
            panic!("no NAT discovery\n{}", client.transcript());
        };
        let found = found.json().unwrap();
        assert_eq!(ip_of(&found["public"]), site.public_ip, "{found}");
        assert_eq!(found["varies_by_destination"], varies, "{found}");
        lab.terminate(&client);
    }
    lab.terminate(&coturn);
    lab.terminate(&server);
}

#[test]
fn a_cut_path_falls_back_to_the_relay_and_a_stopped_peer_takes_its_tunnel_down() {
    let Some((mut lab, tscf)) = lab() else { return };
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    for (transport, transport_args) in PEER_TRANSPORTS {
        let mut call = Call::start(
            &mut lab,
            &tscf,
            &site_a.hosts[0].0,
            &site_b.hosts[0].0,
            transport_args,
        );
        let Some(up) = call.a.wait_for("peer_tunnel_up", Duration::from_secs(15)) else {
            panic!("{transport}: no peer tunnel\n{}", call.transcript());
        };
        assert!(call.media_flows_after(up.at, Duration::from_secs(5)));

        // Remove the NAT mapping mid-call and keep it from coming back.
        let relayed_before = relayed(&lab, &tscf);
        let cut = Instant::now();
        lab.cut(&site_a, site_b.public_ip);
        let Some(down) = call.a.wait_for("peer_tunnel_down", Duration::from_secs(10)) else {
            panic!(
                "{transport}: the peer tunnel stayed up\n{}",
                call.transcript()
            );
        };
        let reason = down.json().unwrap()["reason"].clone();
        assert_eq!(reason, "Silence", "{}", call.transcript());
        assert_eq!(down.json().unwrap()["path"], up.json().unwrap()["path"]);
        assert!(
            call.media_flows_after(down.at, Duration::from_secs(5)),
            "{transport}: media did not return over the relay\n{}",
            call.transcript()
        );
        // The media that arrives again came through the server.
        let relayed_after = relayed(&lab, &tscf);
        assert!(
            relayed_after >= relayed_before + 10,
            "{relayed_before} -> {relayed_after}"
        );
        let gap_a = call.media_a.longest_gap_after(cut);
        let gap_b = call.media_b.longest_gap_after(cut);
        let bound = SILENCE + Duration::from_millis(1500);
        println!(
            "{transport}: mapping removed; peer tunnel down after {:.0} ms ({reason}); media \
             silent for {:.0} ms at a, {:.0} ms at b, then over the relay (bound {:.0} ms)",
            (down.at - cut).as_secs_f64() * 1e3,
            gap_a.as_secs_f64() * 1e3,
            gap_b.as_secs_f64() * 1e3,
            bound.as_secs_f64() * 1e3
        );
        assert!(
            gap_a < bound && gap_b < bound,
            "{transport}: media silent {gap_a:?}/{gap_b:?}\n{}",
            call.transcript()
        );

        // With the path back, a new peer tunnel forms by itself.
        let healed = Instant::now();
        lab.heal(&site_a);
        let Some(again) = call.a.wait_for("peer_tunnel_up", Duration::from_secs(30)) else {
            panic!("{transport}: no new peer tunnel\n{}", call.transcript());
        };
        let again_json = again.json().unwrap();
        assert_eq!(
            ip_of(&again_json["path"]),
            site_b.public_ip,
            "{}",
            call.transcript()
        );
        assert!(call.media_flows_after(again.at, Duration::from_secs(5)));
        println!(
            "{transport}: path restored; new peer tunnel {:.0} ms later (setup {:.1} ms)",
            (again.at - healed).as_secs_f64() * 1e3,
            again_json["setup_ms"].as_f64().unwrap()
        );

        // Stopping client B ends its server tunnel: B tells A on the peer path (a
        // Configuration Release Request) and the director tells A too, whichever reaches A
        // first takes its peer tunnel down. A secured session also ends at once: B closes it
        // as it stops, and that may reach A first.
        let stopped = Instant::now();
        assert_eq!(lab.terminate(&call.b), Some(0), "{}", call.transcript());
        let Some(down) = call.a.wait_for("peer_tunnel_down", Duration::from_secs(10)) else {
            panic!("{transport}: A kept the peer tunnel\n{}", call.transcript());
        };
        let reason = down.json().unwrap()["reason"].clone();
        let secured = *transport != "udp";
        assert!(
            reason == "PeerServerTunnelGone"
                || reason == "Released"
                || (secured && reason == "SessionLost"),
            "{transport}: {reason}\n{}",
            call.transcript()
        );
        println!(
            "{transport}: peer stopped; peer tunnel down at the other client after {:.0} ms \
             ({reason})",
            (down.at - stopped).as_secs_f64() * 1e3
        );
        let Call { server, a, .. } = call;
        lab.terminate(&a);
        lab.terminate(&server);
    }
}

#[test]
fn namespaces_of_a_crashed_run_are_removed() {
    // No process has this id (above the kernel's pid_max), like a run that crashed.
    let stale = "tscflab-999999999-z-pub";
    let made = std::process::Command::new("ip")
        .args(["netns", "add", stale])
        .output();
    if !made.is_ok_and(|out| out.status.success()) {
        // lab() says why namespaces cannot be made, or fails under CI.
        let _ = lab();
        return;
    }
    let Some(_lab) = lab() else { return };
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&list.stdout).contains(stale),
        "{}",
        String::from_utf8_lossy(&list.stdout)
    );
}

#[test]
fn a_panicking_test_leaves_no_namespace_or_process_behind() {
    let Some((lab, tscf)) = lab() else { return };
    drop(lab);
    let made = std::panic::catch_unwind(move || {
        let mut lab = Lab::new().unwrap();
        lab.add_site(Nat::Symmetric, 1);
        let ns = lab.public().to_owned();
        let _running = start_server(&mut lab, &tscf);
        let names = lab.namespaces().to_vec();
        let pids = std::process::Command::new("ip")
            .args(["netns", "pids", &ns])
            .output()
            .unwrap();
        // Unwinds like a failed assertion, without the panic message.
        std::panic::resume_unwind(Box::new((
            names,
            String::from_utf8_lossy(&pids.stdout).into_owned(),
        )));
    });
    let payload = made.expect_err("the closure panics");
    let (names, pids) = payload
        .downcast_ref::<(Vec<String>, String)>()
        .expect("names and pids");
    assert!(names.len() >= 3, "{names:?}");
    assert!(!pids.trim().is_empty(), "the server ran");
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for name in names {
        assert!(!list.contains(name.as_str()), "{name} left behind: {list}");
    }
    for pid in pids.split_whitespace() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left behind"
        );
    }
}
