//! TUN mode in the lab: two clients behind two port-restricted NATs, each with `--tun`, reach
//! each other's internal address with `ping` and `iperf3` (TCP and UDP), first over the relay
//! (the direct path cut), then over the peer tunnel; a ping every 20 ms across the switch
//! loses nothing. The iperf3 throughput of both paths and of the bare veth path is printed.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use tscf_tests::lab::{which, Lab, Nat, Proc, SERVER_IP};

use super::{args, lab, relayed, start_server, FIRST, SECOND};

/// A `tscf client --json --tun --peer` in `ns`; returns once its device is up.
fn start_tun_client(lab: &mut Lab, tscf: &Path, ns: &str, server: SocketAddr) -> Proc {
    let server = server.to_string();
    let list = args(&[
        "client",
        "--server",
        &server,
        "--token",
        tscf_tests::lab::TOKEN,
        "--json",
        "--peer",
        "--tun",
    ]);
    let mut client = lab.spawn(ns, tscf, &list);
    if client.wait_for("tun", Duration::from_secs(15)).is_none() {
        panic!(
            "the TUN client in {ns} did not start\n{}",
            client.transcript()
        );
    }
    client
}

/// `ping` from `ns` to `to`: `count` echoes `interval` apart; how many were sent and answered.
fn ping(lab: &mut Lab, ns: &str, to: Ipv4Addr, count: u32, interval: &str) -> Proc {
    let ping = which("ping").unwrap_or_else(|| panic!("`ping` not found"));
    let count = count.to_string();
    let to = to.to_string();
    lab.spawn(
        ns,
        &ping,
        &args(&["-n", "-i", interval, "-c", &count, "-w", "60", &to]),
    )
}

/// The `N packets transmitted, M received` of a ping's summary.
fn ping_summary(proc: &mut Proc) -> (u64, u64) {
    let Some(line) = proc.wait_for_text("packets transmitted", Duration::from_secs(70)) else {
        panic!("ping did not finish\n{}", proc.transcript());
    };
    let numbers: Vec<u64> = line
        .line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .collect();
    (numbers[0], numbers[1])
}

/// Runs an iperf3 client in `ns` against the server at `to` for `seconds` (UDP at `udp_rate`
/// when given); its JSON report.
fn iperf3(
    lab: &Lab,
    ns: &str,
    to: Ipv4Addr,
    seconds: u32,
    udp_rate: Option<&str>,
) -> serde_json::Value {
    let iperf3 = which("iperf3").unwrap_or_else(|| panic!("`iperf3` not found"));
    let (to, seconds) = (to.to_string(), seconds.to_string());
    let mut list = vec![iperf3.to_str().unwrap(), "-c", &to, "-t", &seconds, "-J"];
    if let Some(rate) = udp_rate {
        list.extend(["-u", "-b", rate, "-l", "1200"]);
    }
    let out = lab.run(ns, &list);
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Megabits per second a TCP report's receiver got.
fn mbps(report: &serde_json::Value) -> f64 {
    let bits = report["end"]["sum_received"]["bits_per_second"].as_f64();
    bits.unwrap_or(0.0) / 1e6
}

/// TCP and UDP throughput from `ns` to `to`, printed under `label`: what the receiver got.
/// UDP runs at an unlimited rate, where the sender floods whatever its first hop takes (a
/// TUN device drops what its reader has not taken yet, so on a small machine a flooding
/// sender spends the CPU the tunnel needs on packets that are lost), and offered at 1.5 and
/// 2 Gbit/s (156,000 and 208,000 packets/s).
fn measure(lab: &Lab, label: &str, ns: &str, to: Ipv4Addr) {
    let tcp = mbps(&iperf3(lab, ns, to, 3, None));
    eprintln!("  {label:<20} TCP {tcp:8.1} Mbit/s");
    for rate in ["0", "1500M", "2000M"] {
        let udp = iperf3(lab, ns, to, 3, Some(rate));
        let sum = &udp["end"]["sum"];
        let kept = 1.0 - sum["lost_percent"].as_f64().unwrap_or(100.0) / 100.0;
        let sent = sum["packets"].as_f64().unwrap_or(0.0) / 3.0;
        let received = sent * kept;
        let offered = match rate {
            "0" => "unlimited",
            "1500M" => "1.5 Gbit/s",
            _ => "2 Gbit/s",
        };
        eprintln!(
            "  {label:<20} UDP 1200 octets, {offered:>10} offered: {:7.1} Mbit/s, \
             {received:.0} packets/s received of {sent:.0} sent",
            received * 1200.0 * 8.0 / 1e6
        );
    }
}

#[test]
fn tun_clients_ping_and_iperf3_over_the_relay_then_a_peer_tunnel() {
    let Some((mut lab, tscf)) = lab() else { return };
    for program in ["ping", "iperf3"] {
        if which(program).is_none() {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("`{program}` not found (scripts/lab-deps installs it)");
            }
            eprintln!("TUN lab skipped: `{program}` not found (scripts/lab-deps installs it)");
            return;
        }
    }
    let (mut server, addr) = start_server(&mut lab, &tscf);
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (site_a.hosts[0].0.clone(), site_b.hosts[0].0.clone());
    // The direct path is cut from the start: the clients begin on the relay.
    lab.cut(&site_a, site_b.public_ip);
    lab.cut(&site_b, site_a.public_ip);
    let mut a = start_tun_client(&mut lab, &tscf, &a_ns, addr);
    let mut b = start_tun_client(&mut lab, &tscf, &b_ns, addr);
    let iperf3_bin = which("iperf3").unwrap();
    let mut iperf3_server = lab.spawn(&b_ns, &iperf3_bin, &args(&["-s", "--forceflush"]));
    assert!(iperf3_server
        .wait_for_text("listening", Duration::from_secs(10))
        .is_some());
    let transcript = |a: &Proc, b: &Proc, s: &Proc| {
        format!("{}{}{}", a.transcript(), b.transcript(), s.transcript())
    };

    // Over the relay.
    let mut relay_ping = ping(&mut lab, &a_ns, SECOND, 5, "0.2");
    let (sent, got) = ping_summary(&mut relay_ping);
    assert_eq!((sent, got), (5, 5), "{}", transcript(&a, &b, &server));
    let before = relayed(&lab, &tscf);
    let tcp = iperf3(&lab, &a_ns, SECOND, 2, None);
    assert!(mbps(&tcp) > 0.0, "{tcp}");
    let udp = iperf3(&lab, &a_ns, SECOND, 2, Some("10M"));
    assert!(udp["end"]["sum"]["packets"].as_u64() > Some(0), "{udp}");
    assert!(
        relayed(&lab, &tscf) - before > 1000,
        "iperf3 took the relay"
    );
    a.drain();
    assert!(
        !a.transcript().contains("\"peer_tunnel_up\""),
        "no peer tunnel while the path is cut\n{}",
        transcript(&a, &b, &server)
    );

    // Across the switch: a ping every 20 ms while the path heals and the peer tunnel comes up.
    let mut switch_ping = ping(&mut lab, &a_ns, SECOND, 1000, "0.02");
    lab.heal(&site_a);
    lab.heal(&site_b);
    for (name, client) in [("A", &mut a), ("B", &mut b)] {
        if client
            .wait_for("peer_tunnel_up", Duration::from_secs(30))
            .is_none()
        {
            panic!(
                "{name}: no peer tunnel after the heal\n{}",
                client.transcript()
            );
        }
    }
    let (sent, got) = ping_summary(&mut switch_ping);
    eprintln!("TUN lab: {got} of {sent} echoes answered across the switch");
    assert_eq!(
        sent,
        got,
        "lost across the switch\n{}",
        transcript(&a, &b, &server)
    );

    // Over the peer tunnel: the relay carries (almost) nothing more.
    let before = relayed(&lab, &tscf);
    let tcp = iperf3(&lab, &a_ns, SECOND, 2, None);
    assert!(mbps(&tcp) > 0.0, "{tcp}");
    let udp = iperf3(&lab, &a_ns, SECOND, 2, Some("10M"));
    assert!(udp["end"]["sum"]["packets"].as_u64() > Some(0), "{udp}");
    let after = relayed(&lab, &tscf) - before;
    assert!(after < 50, "{after} frames relayed over the peer tunnel");
    let mut peer_ping = ping(&mut lab, &b_ns, FIRST, 5, "0.2");
    assert_eq!(ping_summary(&mut peer_ping), (5, 5));

    // Numbers, not asserted: the same iperf3 through the peer tunnel and over the bare veth
    // path (to the public namespace, through the same NAT router).
    let ns = lab.public().to_owned();
    let bind = SERVER_IP.to_string();
    let mut public_iperf3 = lab.spawn(
        &ns,
        &iperf3_bin,
        &args(&["-s", "--forceflush", "-B", &bind]),
    );
    assert!(public_iperf3
        .wait_for_text("listening", Duration::from_secs(10))
        .is_some());
    eprintln!("TUN lab throughput (iperf3, 3 s each):");
    measure(&lab, "peer tunnel (TUN)", &a_ns, SECOND);
    measure(&lab, "bare veth path", &a_ns, SERVER_IP);
    server.drain();
}
