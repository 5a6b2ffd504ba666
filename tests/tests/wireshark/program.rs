//! Captures written by the `tscf` program itself (`--pcap FILE --pcap-envelopes`), read by
//! tshark with the dissector: a server with a TCP and a UDP client, and the TCP client's own
//! capture, while it pings the other over the relay and then over a peer tunnel. The inner
//! packets, the envelopes (as UDP and as TCP segments with their outer addresses) and their
//! directions must decode; and a capture stops at its size limit and stays readable.

use std::process::Command;
use std::time::Duration;

use tscf_tests::program::{self, json_field, Program};

use crate::pdml::Packet;
use crate::{skip, Tshark};

const STOP: Duration = Duration::from_secs(15);

/// The `tscf` binary, or a skip.
fn binary() -> Option<std::path::PathBuf> {
    match tscf_tests::lab::tscf_binary() {
        Ok(b) => Some(b),
        Err(e) => {
            skip(&e);
            None
        }
    }
}

/// `tscf ping` through `client`'s admin endpoint until a reply comes over a peer tunnel.
fn ping_until_direct(client: &Program, target: &str) {
    let out = Command::new(binary().unwrap())
        .args([
            "ping",
            target,
            "--until-direct",
            "-c",
            "100",
            "--interval",
            "0.05",
        ])
        .arg("--admin")
        .arg(json_field(client, "admin", "addr"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn on_interface<'a>(packets: &'a [Packet], name: &str) -> Vec<&'a Packet> {
    packets
        .iter()
        .filter(|p| p.one("frame.interface_name") == name)
        .collect()
}

fn direction(p: &Packet) -> &str {
    match p.one("frame.packet_flags_direction") {
        "0x00000001" => "in",
        "0x00000002" => "out",
        other => panic!("direction {other}\n{p}"),
    }
}

#[test]
fn captures_of_the_program_decode_with_the_dissector() {
    let Some(tshark) = Tshark::find() else { return };
    if binary().is_none() {
        return;
    }
    let dir = tshark.dir();
    let server_file = dir.join("server.pcapng");
    let client_file = dir.join("client.pcapng");
    let server = program::server(
        dir,
        "",
        &["--pcap", server_file.to_str().unwrap(), "--pcap-envelopes"],
    )
    .unwrap();
    let (tcp, udp) = (server.after("tcp "), server.after("udp "));
    // 10.77.0.2 over TCP, capturing; 10.77.0.3 over UDP.
    let a = program::client(
        "client a",
        &[
            "--server",
            &tcp,
            "--transport",
            "tcp",
            "--stun",
            &udp,
            "--peer",
            "--admin",
            "127.0.0.1:0",
            "--pcap",
            client_file.to_str().unwrap(),
            "--pcap-envelopes",
        ],
        "admin",
    )
    .unwrap();
    let b = program::client("client b", &["--server", &udp, "--peer"], "connected").unwrap();
    ping_until_direct(&a, "10.77.0.3");
    assert_eq!(a.stop(STOP), Some(0));
    assert_eq!(b.stop(STOP), Some(0));
    assert_eq!(server.stop(STOP), Some(0));

    let packets = tshark.dissect(&server_file, &[]);
    let envelopes = on_interface(&packets, "tscf-envelopes");
    let inner = on_interface(&packets, "tscf-inner");
    // Both Configuration exchanges, one on TCP segments, one in UDP datagrams, each request
    // received and its response sent.
    for (layers, port) in [("raw:ip:tcp:tscftun", &tcp), ("raw:ip:udp:tscftun", &udp)] {
        let port = port.rsplit(':').next().unwrap();
        let exchange: Vec<_> = envelopes
            .iter()
            .filter(|p| p.protocols() == layers && p.has("tscftun.msg.type"))
            .filter(|p| ["0x01", "0x02"].contains(&p.one("tscftun.msg.type")))
            .collect();
        assert!(exchange.len() >= 2, "{layers}: {exchange:?}");
        let request = exchange[0];
        assert_eq!(request.one("tscftun.msg.type"), "0x01", "{request}");
        assert_eq!(direction(request), "in");
        let to_port = if layers.contains("tcp") {
            "tcp.dstport"
        } else {
            "udp.dstport"
        };
        assert_eq!(request.one(to_port), port, "{request}");
        let response = exchange[1];
        assert_eq!(response.one("tscftun.msg.type"), "0x02", "{response}");
        assert_eq!(direction(response), "out");
        assert_eq!(response.one("tscftun.result_code"), "0", "{response}");
    }
    // The first ping was relayed: received from A over TCP, sent to B over UDP, and its inner
    // packet shown once, as it left.
    let relayed = |layers: &str| {
        envelopes
            .iter()
            .find(|p| p.protocols().starts_with(layers) && p.has("echo"))
            .unwrap_or_else(|| panic!("no relayed ping on {layers}"))
    };
    let from_a = relayed("raw:ip:tcp:tscftun:ip:udp");
    assert_eq!(direction(from_a), "in");
    assert_eq!(from_a.all("ip.src")[1], "10.77.0.2", "{from_a}");
    let to_b = relayed("raw:ip:udp:tscftun:ip:udp");
    assert_eq!(direction(to_b), "out");
    assert_eq!(to_b.all("ip.dst")[1], "10.77.0.3", "{to_b}");
    let ping = inner
        .iter()
        .find(|p| p.has("udp") && p.one("udp.dstport") == "7")
        .expect("the relayed ping");
    assert_eq!(ping.protocols(), "raw:ip:udp:echo");
    assert_eq!(ping.one("ip.src"), "10.77.0.2");

    // The client saw its pings leave and the answers come back, and the peer tunnel's probes
    // and Configuration exchange on the peer path.
    let packets = tshark.dissect(&client_file, &[]);
    let inner = on_interface(&packets, "tscf-inner");
    let pings: Vec<_> = inner.iter().filter(|p| p.has("echo")).collect();
    assert!(pings
        .iter()
        .any(|p| direction(p) == "out" && p.one("udp.dstport") == "7"));
    assert!(pings
        .iter()
        .any(|p| direction(p) == "in" && p.one("udp.srcport") == "7"));
    let envelopes = on_interface(&packets, "tscf-envelopes");
    let types: Vec<&str> = envelopes
        .iter()
        .filter(|p| p.protocols().starts_with("raw:ip:udp:tscftun"))
        .flat_map(|p| p.all("tscftun.msg.type"))
        .collect();
    for (t, what) in [("0x0b", "Peer Probe"), ("0x0c", "Peer Probe Response")] {
        assert!(types.contains(&t), "no {what} on the peer path: {types:?}");
    }
    assert!(
        envelopes
            .iter()
            .any(|p| p.protocols() == "raw:ip:tcp:tscftun" && direction(p) == "out"),
        "the server transport's envelopes as TCP segments"
    );
}

#[test]
fn a_capture_stops_at_its_limit_and_stays_readable() {
    let Some(tshark) = Tshark::find() else { return };
    if binary().is_none() {
        return;
    }
    let dir = tshark.dir();
    let file = dir.join("small.pcapng");
    let limit = 3_000u64;
    let server = program::server(dir, "", &[]).unwrap();
    let udp = server.after("udp ");
    let a = program::client(
        "client a",
        &[
            "--server",
            &udp,
            "--admin",
            "127.0.0.1:0",
            "--pcap",
            file.to_str().unwrap(),
            "--pcap-envelopes",
            "--pcap-max-bytes",
            &limit.to_string(),
        ],
        "admin",
    )
    .unwrap();
    let b = program::client("client b", &["--server", &udp], "connected").unwrap();
    // 30 pings and answers are far more than 3,000 octets of capture.
    let out = Command::new(binary().unwrap())
        .args([
            "ping",
            "10.77.0.3",
            "-c",
            "30",
            "--interval",
            "0.01",
            "--admin",
        ])
        .arg(json_field(&a, "admin", "addr"))
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(a.stop(STOP), Some(0));
    assert_eq!(b.stop(STOP), Some(0));
    assert_eq!(server.stop(STOP), Some(0));
    let size = std::fs::metadata(&file).unwrap().len();
    assert!(size <= limit, "{size} octets");
    let packets = tshark.dissect(&file, &[]);
    assert!(packets.len() > 5, "{} packets", packets.len());
    assert!(
        packets.len() < 60,
        "{} packets: the limit did not stop it",
        packets.len()
    );
}
