//! The `tscf` program, run as a process.
#![allow(missing_docs, clippy::unwrap_used)]

#[path = "support/redis.rs"]
mod redis;

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn tscf(args: &[&str]) -> Output {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(15), "{args:?}");
    out
}

/// A configuration file of one test, removed when the test is done with it.
struct ConfigFile(PathBuf);

impl std::ops::Deref for ConfigFile {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn config_file(name: &str, text: &str) -> ConfigFile {
    let path = std::env::temp_dir().join(format!("tscf-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    ConfigFile(path)
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn server_runs_for_a_second_and_prints_addresses_and_fingerprint() {
    let path = config_file(
        "ephemeral",
        "tcp = [\"127.0.0.1:0\"]\ntls = [\"127.0.0.1:0\"]\nudp = [\"127.0.0.1:0\"]\n",
    );
    let out = tscf(&[
        "server",
        "--for",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--config",
        path.to_str().unwrap(),
    ]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("admin 127.0.0.1:"), "{stdout}");
    for kind in ["tcp 127.0.0.1:", "tls 127.0.0.1:", "udp 127.0.0.1:"] {
        assert!(stdout.contains(kind), "{stdout}");
    }
    let fingerprint = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("tls fingerprint "))
        .expect("fingerprint printed");
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    assert!(fingerprint.bytes().all(|b| b.is_ascii_hexdigit()));
}

#[test]
fn plain_listeners_beyond_loopback_need_allow_plain_and_are_warned_about() {
    let path = config_file(
        "plain-anywhere",
        "udp = [\"0.0.0.0:0\"]\ntcp = []\ntls = []\nquic = []\ndtls = []\n\
         auth_tokens = [\"a-long-enough-token\"]\n",
    );
    let config = path.to_str().unwrap();
    let out = tscf(&[
        "server",
        "--for",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--config",
        config,
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("plain UDP listener 0.0.0.0:0"), "{stderr}");
    let out = tscf(&[
        "server",
        "--for",
        "1",
        "--admin",
        "127.0.0.1:0",
        "--allow-plain",
        "--config",
        config,
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("udp 0.0.0.0:"), "{stdout}");
    assert!(
        stderr.contains("WARN") && stderr.contains("plain UDP listener"),
        "{stderr}"
    );
}

#[test]
fn server_with_the_default_configuration() {
    // The default ports are fixed; another program may hold them, which is a runtime failure.
    let out = tscf(&["server", "--for", "1"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    match out.status.code() {
        Some(0) => {
            assert!(stdout.contains("tcp 127.0.0.1:4440"), "{stdout}");
            assert!(stdout.contains("tls 127.0.0.1:4443"), "{stdout}");
            assert!(stdout.contains("udp 127.0.0.1:4440"), "{stdout}");
            assert!(stdout.contains("quic 127.0.0.1:4444"), "{stdout}");
            assert!(stdout.contains("dtls 127.0.0.1:4445"), "{stdout}");
            assert!(stdout.contains("tls fingerprint "), "{stdout}");
        }
        Some(1) => assert!(stderr.contains("cannot listen"), "{stderr}"),
        other => panic!("exit {other:?}: {stdout}{stderr}"),
    }
}

#[test]
fn a_bad_key_is_a_configuration_error_naming_it() {
    let path = config_file("unknown-key", "tcp = [\"127.0.0.1:0\"]\nudp_listen = []\n");
    let out = tscf(&["server", "--for", "1", "--config", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("udp_listen"), "{stderr}");

    let path = config_file("bad-value", "udp = [\"127.0.0.1\"]\n");
    let out = tscf(&["server", "--config", path.to_str().unwrap()]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("udp") && stderr.contains("line 1"),
        "{stderr}"
    );
}

#[test]
fn a_missing_config_file_is_a_configuration_error() {
    let out = tscf(&["server", "--config", "/nonexistent/tscf.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("/nonexistent/tscf.toml"));
}

#[test]
fn help_and_usage_errors() {
    let out = tscf(&["--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("server"));
    let out = tscf(&["server", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("--config"));
    let out = tscf(&["frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["client", "--bogus"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["client", "--forward", "127.0.0.1:5004"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["client", "--transport", "tls", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--fingerprint"));
    let out = tscf(&[
        "client",
        "--peer-transport",
        "udp",
        "--peer-require-secure",
        "--for",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--peer-transport dtls or quic"));
    let out = tscf(&["client", "--peer-transport", "tcp", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2), "no peer transport over TCP");
    let out = tscf(&["client", "--transport", "dtls", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--fingerprint"));
    let out = tscf(&["server", "--admin", "0.0.0.0:4449", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("loopback"));
}

/// A server on ephemeral ports (`extra` appended to the configuration), running `seconds`,
/// and what it printed up to its last address line.
fn spawn_server(name: &str, extra: &str, seconds: &str) -> (Child, String) {
    let path = config_file(
        name,
        &format!("tcp = [\"127.0.0.1:0\"]\nudp = [\"127.0.0.1:0\"]\n{extra}"),
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .args(["server", "--for", seconds, "--admin", "127.0.0.1:0"])
        .args(["--config", path.to_str().unwrap()])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut printed = String::new();
    while !printed.contains("admin ") {
        assert!(stdout.read_line(&mut printed).unwrap() > 0, "{printed}");
    }
    // Keep reading, so that the server's last line does not meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
    (child, printed)
}

/// The address after `prefix` on a line of `printed`.
fn address(printed: &str, prefix: &str) -> String {
    printed
        .lines()
        .find_map(|l| l.trim().strip_prefix(prefix))
        .unwrap_or_else(|| panic!("no {prefix:?} in {printed}"))
        .to_owned()
}

fn json_lines(stdout: &str) -> Vec<serde_json::Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[test]
fn client_prints_its_internal_address_and_stops() {
    let (mut server, printed) = spawn_server("client", "", "5");
    let udp = address(&printed, "udp ");
    let out = tscf(&["client", "--server", &udp, "--for", "2"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("internal 10.77."), "{stdout}");
    assert!(stdout.contains("tunnel id "), "{stdout}");
    assert!(
        stdout.contains("seen by the server as 127.0.0.1:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("inner packets up to 1400 octets (UDP payload up to 1372)"),
        "{stdout}"
    );

    let tcp = address(&printed, "tcp ");
    let out = tscf(&[
        "client",
        "--server",
        &tcp,
        "--transport",
        "tcp",
        "--for",
        "1",
        "--json",
        "--forward",
        "127.0.0.1:0=10.77.0.2:5004",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    assert_eq!(lines[0]["event"], "connected");
    assert!(lines[0]["ipv4"].as_str().unwrap().starts_with("10.77."));
    assert_eq!(lines[0]["max_packet"], 1400);
    // Over TCP the server chooses the keepalive: its default for streams.
    assert_eq!(lines[0]["keepalive_s"], 300.0);
    assert_eq!(lines[1]["event"], "forward");
    assert_eq!(lines.last().unwrap()["event"], "stopped");
    for line in &lines {
        assert_timestamped(line);
    }

    // Over UDP the client proposes a keepalive short enough for NATs, or the one asked for.
    for (extra, expected) in [(None, 20.0), (Some("7"), 7.0)] {
        let mut args = vec!["client", "--server", &udp, "--for", "1", "--json"];
        if let Some(secs) = extra {
            args.extend(["--keepalive", secs]);
        }
        let out = tscf(&args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        let lines = json_lines(&text(&out.stdout));
        assert_eq!(lines[0]["keepalive_s"], expected, "{lines:?}");
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Every JSON event carries `ts`: RFC 3339 in UTC with milliseconds.
fn assert_timestamped(line: &serde_json::Value) {
    let ts = line["ts"]
        .as_str()
        .unwrap_or_else(|| panic!("no ts in {line}"));
    let b = ts.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    assert!(
        b.len() == 24
            && digits(0..4)
            && b[4] == b'-'
            && digits(5..7)
            && b[7] == b'-'
            && digits(8..10)
            && b[10] == b'T'
            && digits(11..13)
            && b[13] == b':'
            && digits(14..16)
            && b[16] == b':'
            && digits(17..19)
            && b[19] == b'.'
            && digits(20..23)
            && b[23] == b'Z',
        "{ts}"
    );
}

/// A server that never answers: the client says what it sent, where, and that nothing came
/// back, instead of "last failure: none".
#[test]
fn a_client_whose_server_never_answers_says_what_it_tried() {
    // A bound socket that never reads: datagrams to it vanish without an ICMP error.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let out = tscf(&["client", "--server", &addr, "--connect-timeout", "2"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "Configuration Requests to {addr} over UDP, no answer"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("can its answers reach this host?"),
        "{stderr}"
    );
}

#[test]
fn a_refused_client_exits_3() {
    let (mut server, printed) =
        spawn_server("refused", "auth_tokens = [\"s3cret-s3cret-s3cret\"]\n", "5");
    let udp = address(&printed, "udp ");
    let out = tscf(&["client", "--server", &udp, "--for", "1", "--token", "wrong"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("Unauthorized"));
    let out = tscf(&[
        "client",
        "--server",
        &udp,
        "--for",
        "1",
        "--token",
        "s3cret-s3cret-s3cret",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn status_reports_a_running_server_and_fails_without_one() {
    let (mut server, printed) = spawn_server("status", "", "3");
    let admin = address(&printed, "admin ");
    let out = tscf(&["status", "--admin", &admin, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let status = &json_lines(&text(&out.stdout))[0];
    assert_eq!(status["state"], "listening");
    assert_eq!(status["listeners"]["udp"][0], address(&printed, "udp "));
    assert_eq!(status["director"]["active_tunnels"], 0);
    assert!(status["tunnels"].as_array().unwrap().is_empty());
    let out = tscf(&["status", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("tunnels: 0 active"));
    // A request other than `status` is answered with an error.
    let mut stream = std::net::TcpStream::connect(&admin).unwrap();
    stream.write_all(b"hello\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({ "error": "unknown request \"hello\"" })
    );
    assert_eq!(server.wait().unwrap().code(), Some(0));

    // The server has stopped: nobody answers.
    let out = tscf(&["status", "--admin", &admin]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("cannot reach"));
}

/// Each kind of hostile or useless input the protocol says is counted moves its counter in
/// `tscf status` and in the metrics: a datagram whose envelope length is wrong, inner packets
/// that are spoofed, oversized, malformed or for an address nobody holds, malformed control
/// messages, and requests answered Unauthorized and Rate Limited.
#[test]
fn every_counted_drop_shows_in_status_and_metrics() {
    use tscf_core::wire::{Envelope, EnvelopeType, Message, MessageType, ResultCode};
    let (mut server, printed) = spawn_server(
        "counted",
        "auth_tokens = [\"open sesame, please\"]\nmetrics = \"127.0.0.1:0\"\n",
        "30",
    );
    let udp: std::net::SocketAddr = address(&printed, "udp ").parse().unwrap();
    let admin = address(&printed, "admin ");
    let metrics = address(&printed, "metrics http://");
    let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut ask = |socket: &std::net::UdpSocket, request: &Message<'_>| {
        let mut bytes = Vec::new();
        request.encode_envelope(&mut bytes).unwrap();
        socket.send_to(&bytes, udp).unwrap();
        let n = socket.recv(&mut buf).unwrap();
        let answer =
            Message::decode(Envelope::decode_datagram(&buf[..n]).unwrap().payload).unwrap();
        let address = answer.tlvs.internal_ipv4.map(|a| a.addr);
        (answer.tlvs.result_code.unwrap(), address)
    };
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([1; 16]);
    request.tlvs.auth_token = Some(b"open sesame, please");
    let (result, mine) = ask(&client, &request);
    assert_eq!(result, ResultCode::SUCCESS);
    let mine = mine.unwrap();

    let data = |packet: &[u8]| {
        let mut envelope = Vec::new();
        Envelope::encode(EnvelopeType::DATA, packet, &mut envelope).unwrap();
        client.send_to(&envelope, udp).unwrap();
    };
    let packet = |src: [u8; 4], dst: [u8; 4], len: usize| {
        let mut p = Vec::new();
        etherparse::PacketBuilder::ipv4(src, dst, 64)
            .udp(5004, 5004)
            .write(&mut p, &vec![0u8; len])
            .unwrap();
        p
    };
    data(&packet([10, 99, 0, 1], [10, 77, 0, 9], 10)); // spoofed source
    data(&packet(mine.octets(), [10, 77, 0, 200], 10)); // nobody holds it
    data(&packet(mine.octets(), [10, 77, 0, 200], 1500)); // over 1400 octets
    data(&[0x45, 0, 0]); // not an IP packet
                         // An envelope whose length field does not match the datagram.
    let mut envelope = Vec::new();
    Envelope::encode(
        EnvelopeType::DATA,
        &packet(mine.octets(), mine.octets(), 8),
        &mut envelope,
    )
    .unwrap();
    client
        .send_to(&envelope[..envelope.len() - 1], udp)
        .unwrap();

    // From another socket: a truncated control message, and requests without the token
    // until the source is rate limited.
    let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    other
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut truncated = Vec::new();
    Envelope::encode(EnvelopeType::CONTROL, &[1, 1, 0], &mut truncated).unwrap();
    other.send_to(&truncated, udp).unwrap();
    let mut results = Vec::new();
    for sequence in 1..=11 {
        let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, sequence, 0);
        request.tlvs.client_nonce = Some([sequence as u8; 16]);
        results.push(ask(&other, &request).0);
    }
    assert_eq!(results[0], ResultCode::UNAUTHORIZED);
    assert_eq!(results[10], ResultCode::RATE_LIMITED);

    let mut status = serde_json::Value::Null;
    let dropped =
        |status: &serde_json::Value, name: &str| status["director"]["dropped"][name].as_u64();
    let started = Instant::now();
    while dropped(&status, "bad_control").unwrap_or(0) == 0 {
        assert!(started.elapsed() < Duration::from_secs(15), "{status}");
        let out = tscf(&["status", "--admin", &admin, "--json"]);
        status = json_lines(&text(&out.stdout)).remove(0);
    }
    for name in [
        "bad_envelope",
        "spoofed_source",
        "unknown_destination",
        "oversized",
        "bad_packet",
        "bad_control",
    ] {
        assert_eq!(dropped(&status, name), Some(1), "{name}: {status}");
    }
    let refused = &status["director"]["refused"];
    assert_eq!(refused["unauthorized"], 10, "{status}");
    assert_eq!(refused["rate_limited"], 1, "{status}");

    let mut scrape = std::net::TcpStream::connect(metrics.trim_end_matches("/metrics")).unwrap();
    scrape
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tscf\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    std::io::Read::read_to_string(&mut scrape, &mut body).unwrap();
    for line in [
        "tscf_server_dropped_total{reason=\"bad_envelope\"} 1",
        "tscf_server_dropped_total{reason=\"spoofed_source\"} 1",
        "tscf_server_dropped_total{reason=\"unknown_destination\"} 1",
        "tscf_server_dropped_total{reason=\"oversized\"} 1",
        "tscf_server_dropped_total{reason=\"bad_packet\"} 1",
        "tscf_server_dropped_total{reason=\"bad_control\"} 1",
        "tscf_server_configuration_exchanges_total{result=\"unauthorized\"} 10",
        "tscf_server_configuration_exchanges_total{result=\"rate_limited\"} 1",
    ] {
        assert!(body.contains(line), "{line} in {body}");
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

/// One loopback client used to push the server to 1.27 GB by sending a request line without
/// end, and clients were served one at a time: a client that sent nothing held the endpoint
/// for everyone. Now a request is bounded and slow clients do not block others.
#[test]
fn admin_endpoint_bounds_requests_and_serves_clients_side_by_side() {
    let (mut server, printed) = spawn_server("admin-flood", "", "10");
    let admin = address(&printed, "admin ");
    let silent: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(&admin).unwrap())
        .collect();
    let mut flood = std::net::TcpStream::connect(&admin).unwrap();
    // The server answers after 256 octets and closes; the rest of the flood may be refused.
    let _ = flood.write_all(&vec![b'x'; 4 << 20]);
    let mut line = String::new();
    std::io::BufReader::new(&flood)
        .read_line(&mut line)
        .unwrap();
    let answer: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(
        answer,
        serde_json::json!({ "error": "request longer than 256 octets" })
    );
    // Silent clients hold slots; status still answers at once.
    let out = tscf(&["status", "--admin", &admin, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    drop(silent);
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn demo_forms_a_peer_tunnel_and_measures_both_paths() {
    let out = tscf(&["demo", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    assert!(lines.iter().any(|l| l["event"] == "peer_tunnel_up"));
    for line in &lines {
        assert_timestamped(line);
    }
    let results: Vec<_> = lines.iter().filter(|l| l["event"] == "result").collect();
    assert_eq!(results.len(), 2, "{lines:?}");
    assert_eq!(results[0]["path"], "relay");
    assert_eq!(results[1]["path"], "peer");
    for r in results {
        // Both paths are sub-millisecond on loopback: check the shape, not which is faster.
        let rtt = &r["rtt_us"];
        assert!(rtt["min"].as_f64().unwrap() <= rtt["median"].as_f64().unwrap());
        assert!(rtt["median"].as_f64().unwrap() <= rtt["max"].as_f64().unwrap());
        assert!(r["bulk"]["received"].as_u64().unwrap() > 0, "{r}");
        assert!(r["mbit_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    }
    let peer = lines.iter().find(|l| l["event"] == "peer").unwrap();
    assert!(peer["peer_data_sent"].as_u64().unwrap() > 0);
}

#[test]
fn server_stops_cleanly_at_sigterm() {
    let path = config_file("sigterm", "udp = [\"127.0.0.1:0\"]\nadmin = \"\"\n");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .args(["server", "--for", "10", "--config", path.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until it listens: the first line is printed after the listeners are bound.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert!(line.contains("listening"), "{line}");
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// At SIGTERM the server tells a UDP client its tunnel is shut down, and retransmits the
/// notification the client lost until the client acknowledges it; then it exits, well before
/// its (long) shutdown grace.
#[test]
fn at_sigterm_a_lost_release_notification_is_sent_again_until_acknowledged() {
    use tscf_core::wire::{ControlKey, Envelope, Message, MessageType, ResultCode};
    let (mut server, printed) = spawn_server("sigterm-udp", "shutdown_grace_ms = 60000\n", "30");
    let udp: std::net::SocketAddr = address(&printed, "udp ").parse().unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 2048];
    let mut receive = || {
        let n = socket.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    };
    let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    request.tlvs.client_nonce = Some([7; 16]);
    let mut bytes = Vec::new();
    request.encode_envelope(&mut bytes).unwrap();
    socket.send_to(&bytes, udp).unwrap();
    let response = receive();
    let payload = Envelope::decode_datagram(&response).unwrap().payload;
    let response = Message::decode(payload).unwrap();
    assert_eq!(response.tlvs.result_code, Some(ResultCode::SUCCESS));
    let key = ControlKey::new(&response.tlvs.control_key.unwrap());

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let first = receive();
    let again = receive();
    assert_eq!(first, again, "the same notification, retransmitted");
    let payload = Envelope::decode_datagram(&again).unwrap().payload;
    let note = Message::decode(payload).unwrap();
    assert_eq!(
        note.header.message_type,
        MessageType::CONFIGURATION_RELEASE_NOTIFICATION
    );
    assert_eq!(note.tlvs.result_code, Some(ResultCode::SHUTDOWN));
    let mut ack = Vec::new();
    Message::response_to(&note.header, ResultCode::SUCCESS)
        .encode_envelope_with_integrity(&key.client_to_director(), &mut ack)
        .unwrap();
    socket.send_to(&ack, udp).unwrap();
    // Acknowledged: it exits now rather than at the end of its grace.
    let (done, exited) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(server.wait().unwrap());
    });
    let status = exited
        .recv_timeout(Duration::from_secs(15))
        .expect("the server exits once its clients acknowledged");
    assert_eq!(status.code(), Some(0));
}

/// A `tscf client --json` process and its first lines, up to its last `forward` or `listen`
/// line.
fn spawn_client(
    args: &[&str],
) -> (
    Child,
    Vec<serde_json::Value>,
    std::thread::JoinHandle<String>,
) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .arg("client")
        .args(args)
        .args(["--json", "--peer"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let ports = args
        .iter()
        .filter(|a| ["--forward", "--listen"].contains(a))
        .count();
    let mut lines: Vec<serde_json::Value> = Vec::new();
    let port_lines = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .filter(|l| l["event"] == "forward" || l["event"] == "listen")
            .count()
    };
    while port_lines(&lines) < ports {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{lines:?}");
        lines.push(serde_json::from_str(&line).unwrap());
    }
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        rest
    });
    (child, lines, rest)
}

#[test]
fn two_clients_forward_local_udp_ports_over_a_peer_tunnel() {
    forward_over_a_peer_tunnel("forward", "udp");
}

#[test]
fn two_clients_forward_local_udp_ports_over_a_quic_peer_tunnel() {
    forward_over_a_peer_tunnel("forward-quic", "quic");
}

#[test]
fn two_clients_forward_local_udp_ports_over_a_dtls_peer_tunnel() {
    forward_over_a_peer_tunnel("forward-dtls", "dtls");
}

/// Client A carries its inner TCP port 8000 to a local echo service and its inner UDP port
/// 5004 to a local receiver that never sends first; client B forwards local TCP and UDP ports
/// to them. Both ways work through the tunnel.
#[test]
fn tcp_forwards_and_inner_ports_listening_for_local_services() {
    let (mut server, printed) = spawn_server("listen", "", "8");
    let udp = address(&printed, "udp ");
    let echo = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let echo_addr = echo.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (mut conn, _) = echo.accept().unwrap();
        let mut buf = [0u8; 1024];
        while let Ok(n @ 1..) = std::io::Read::read(&mut conn, &mut buf) {
            conn.write_all(&buf[..n]).unwrap();
        }
    });
    let receiver = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    receiver
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let receiver_addr = receiver.local_addr().unwrap().to_string();
    // The first client gets 10.77.0.2.
    let tcp_listen = format!("tcp:8000={echo_addr}");
    let udp_listen = format!("udp:5004={receiver_addr}");
    let (mut a, a_lines, _) = spawn_client(&[
        "--server",
        &udp,
        "--for",
        "5",
        "--listen",
        &tcp_listen,
        "--listen",
        &udp_listen,
    ]);
    assert_eq!(a_lines[0]["ipv4"], "10.77.0.2", "{a_lines:?}");
    assert_eq!(a_lines[1]["event"], "listen");
    assert_eq!(a_lines[1]["internal"], "10.77.0.2:8000");
    let (mut b, b_lines, _) = spawn_client(&[
        "--server",
        &udp,
        "--for",
        "5",
        "--forward",
        "tcp:127.0.0.1:0=10.77.0.2:8000",
        "--forward",
        "udp:127.0.0.1:0=10.77.0.2:5004",
    ]);
    let local = |i: usize| -> std::net::SocketAddr {
        b_lines[i]["local"].as_str().unwrap().parse().unwrap()
    };
    assert_eq!(b_lines[1]["protocol"], "tcp");
    let mut conn = std::net::TcpStream::connect(local(1)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    conn.write_all(b"over inner tcp").unwrap();
    let mut echoed = [0u8; 14];
    std::io::Read::read_exact(&mut conn, &mut echoed).unwrap();
    assert_eq!(&echoed, b"over inner tcp");

    // The receiver never sent anything, yet the datagrams reach it; its answer goes back.
    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    app.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(3);
    let from = loop {
        assert!(Instant::now() < deadline, "the receiver got nothing");
        app.send_to(b"rtp", local(2)).unwrap();
        if let Ok((n, from)) = receiver.recv_from(&mut buf) {
            assert_eq!(&buf[..n], b"rtp");
            break from;
        }
    };
    receiver.send_to(b"rtcp", from).unwrap();
    let (n, _) = app.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"rtcp");
    assert_eq!(a.wait().unwrap().code(), Some(0));
    assert_eq!(b.wait().unwrap().code(), Some(0));
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Two clients offering `peer_transport` forward local UDP ports to each other; the peer
/// tunnel comes up over that transport.
fn forward_over_a_peer_tunnel(name: &str, peer_transport: &str) {
    let (mut server, printed) = spawn_server(name, "", "8");
    let udp = address(&printed, "udp ");
    // The first client gets 10.77.0.2, the second 10.77.0.3.
    let common = [
        "--server",
        &udp,
        "--peer-transport",
        peer_transport,
        "--for",
        "4",
        "--forward",
    ];
    let (mut a, a_lines, a_rest) =
        spawn_client(&[&common[..], &["127.0.0.1:0=10.77.0.3:5004"]].concat());
    let (mut b, b_lines, b_rest) =
        spawn_client(&[&common[..], &["127.0.0.1:0=10.77.0.2:5004"]].concat());
    assert_eq!(a_lines[0]["ipv4"], "10.77.0.2", "{a_lines:?}");
    assert_eq!(b_lines[0]["ipv4"], "10.77.0.3", "{b_lines:?}");
    let local_a: std::net::SocketAddr = a_lines[1]["local"].as_str().unwrap().parse().unwrap();
    let local_b: std::net::SocketAddr = b_lines[1]["local"].as_str().unwrap().parse().unwrap();

    let app_a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let app_b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for s in [&app_a, &app_b] {
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
    }
    // B's application speaks first, so that client B knows where answers go; then A's
    // datagrams reach it, and B's answers reach A's application.
    let mut buf = [0u8; 64];
    let deadline = Instant::now() + Duration::from_secs(3);
    let (mut a_got, mut b_got) = (false, false);
    while !(a_got && b_got) {
        assert!(Instant::now() < deadline, "a got {a_got}, b got {b_got}");
        app_b.send_to(b"from b", local_b).unwrap();
        app_a.send_to(b"from a", local_a).unwrap();
        if let Ok((n, _)) = app_b.recv_from(&mut buf) {
            b_got |= &buf[..n] == b"from a";
        }
        if let Ok((n, _)) = app_a.recv_from(&mut buf) {
            a_got |= &buf[..n] == b"from b";
        }
    }
    assert_eq!(a.wait().unwrap().code(), Some(0));
    assert_eq!(b.wait().unwrap().code(), Some(0));
    let (a_rest, b_rest) = (a_rest.join().unwrap(), b_rest.join().unwrap());
    let over = format!("\"transport\":\"{}\"", peer_transport.to_uppercase());
    let up = |rest: &str| {
        rest.lines()
            .any(|l| l.contains("\"peer_tunnel_up\"") && l.contains(&over))
    };
    assert!(up(&a_rest) || up(&b_rest), "{a_rest}{b_rest}");
    // One side initiated, the other was asked; each names the kinds of the pair it knows.
    let ups: Vec<serde_json::Value> = json_lines(&format!("{a_rest}{b_rest}"))
        .into_iter()
        .filter(|l| l["event"] == "peer_tunnel_up")
        .collect();
    assert!(ups
        .iter()
        .all(|l| l["initiator"] == "local" || l["initiator"] == "peer"));
    assert!(
        ups.iter().any(|l| l["remote_candidate"] == "host"),
        "on loopback the pair is of host candidates: {ups:?}"
    );
    for line in &ups {
        assert_timestamped(line);
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

/// `--forward` used to take datagrams from any tunnel, hand the reply path to any local
/// sender, and drop datagrams too large for the tunnel without a word. Now it refuses the
/// first two, each kind of drop is reported once and counted at the end, and a datagram
/// larger than the tunnel carries crosses it in IPv4 fragments.
#[test]
fn forward_refuses_foreign_senders_and_reports_every_drop() {
    let (mut server, printed) = spawn_server("forward-drops", "", "8");
    let udp = address(&printed, "udp ");
    let common = ["--server", &udp, "--for", "4", "--forward"];
    // A (10.77.0.2) forwards to B's port 7000; C (10.77.0.4) writes to A's port 7000 too.
    let (mut a, a_lines, a_rest) =
        spawn_client(&[&common[..], &["127.0.0.1:0=10.77.0.3:7000"]].concat());
    let (mut b, _, b_rest) = spawn_client(&[&common[..], &["127.0.0.1:0=10.77.0.2:7000"]].concat());
    let (mut c, c_lines, _) =
        spawn_client(&[&common[..], &["127.0.0.1:0=10.77.0.2:7000"]].concat());
    assert_eq!(a_lines[0]["ipv4"], "10.77.0.2", "{a_lines:?}");
    assert_eq!(c_lines[0]["ipv4"], "10.77.0.4", "{c_lines:?}");
    let local_a: std::net::SocketAddr = a_lines[1]["local"].as_str().unwrap().parse().unwrap();
    let local_c: std::net::SocketAddr = c_lines[1]["local"].as_str().unwrap().parse().unwrap();

    let app = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let intruder = std::net::UdpSocket::bind("127.0.0.2:0").unwrap();
    let app_c = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    app.send_to(b"the application", local_a).unwrap();
    intruder.send_to(b"another host", local_a).unwrap();
    app.send_to(&[0u8; 1500], local_a).unwrap();
    app_c.send_to(b"from another tunnel", local_c).unwrap();

    assert_eq!(a.wait().unwrap().code(), Some(0));
    let rest = a_rest.join().unwrap();
    let lines = json_lines(&rest);
    let reasons: Vec<&str> = lines
        .iter()
        .filter(|l| l["event"] == "forward_dropped")
        .filter_map(|l| l["reason"].as_str())
        .collect();
    for reason in ["foreign_local_sender", "foreign_inner_source"] {
        assert!(reasons.contains(&reason), "{reason} in {rest}");
    }
    assert!(!reasons.contains(&"send_failed"), "{rest}");
    for child in [&mut b, &mut c] {
        child.wait().unwrap();
    }
    // B's application never sent, so B has nowhere to put what A's carried: both datagrams,
    // the 1,500-octet one reassembled, are counted there.
    let b_rest = b_rest.join().unwrap();
    let b_lines = json_lines(&b_rest);
    let summary = b_lines
        .iter()
        .find(|l| l["event"] == "forward_drops")
        .unwrap_or_else(|| panic!("{b_rest}"));
    assert_eq!(summary["no_local_sender_yet"], 2, "{summary}");
    server.kill().unwrap();
    server.wait().unwrap();
}

/// Runs `tscf client --transport TRANSPORT` (tls, dtls or quic) against a server of its own: the
/// printed fingerprint is accepted; another one fails with exit 1. Then `more` gets the base
/// arguments and the fingerprint, and the stderr of the failure is returned.
fn client_pins_the_fingerprint(transport: &str, more: impl FnOnce(&[&str], &str)) -> String {
    let listener = format!("{transport} = [\"127.0.0.1:0\"]\n");
    let (mut server, printed) = spawn_server(transport, &listener, "6");
    let addr = address(&printed, &format!("{transport} "));
    let fingerprint = address(&printed, "tls fingerprint ");
    let base = [
        "client",
        "--transport",
        transport,
        "--server",
        &addr,
        "--for",
        "1",
    ];
    let out = tscf(&[&base[..], &["--fingerprint", &fingerprint]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("internal 10.77."));
    // Another certificate's fingerprint: no tunnel, a runtime failure.
    let wrong = "ab".repeat(32);
    let out = tscf(
        &[
            &base[..],
            &["--fingerprint", &wrong, "--connect-timeout", "1"],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    more(&base, &fingerprint);
    server.kill().unwrap();
    server.wait().unwrap();
    text(&out.stderr)
}

#[test]
fn client_over_tls_pins_the_fingerprint_or_warns_when_insecure() {
    client_pins_the_fingerprint("tls", |base, _| {
        let out = tscf(&[base, &["--insecure"]].concat());
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("warning: --insecure"));
        let out = tscf(&[base, &["--fingerprint", "xyz"]].concat());
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    });
}

#[test]
fn client_over_dtls_pins_the_fingerprint() {
    let stderr = client_pins_the_fingerprint("dtls", |_, _| {});
    assert!(stderr.contains("DTLS"), "{stderr}");
}

#[test]
fn client_over_quic_pins_the_fingerprint() {
    client_pins_the_fingerprint("quic", |base, fingerprint| {
        // The same from a configuration file: transport, server and fingerprint.
        let server = base[4];
        let path = config_file(
            "client-quic",
            &format!(
                "transport = \"quic\"\nserver = \"{server}\"\nfingerprint = \"{fingerprint}\"\n"
            ),
        );
        let out = tscf(&["client", "--config", path.to_str().unwrap(), "--for", "1"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert!(text(&out.stdout).contains("internal 10.77."));
    });
}

#[test]
fn netcheck_asks_each_stun_server_for_the_mapping() {
    let (mut a, printed_a) = spawn_server("netcheck-a", "", "10");
    let (mut b, printed_b) = spawn_server("netcheck-b", "", "10");
    let (udp_a, udp_b) = (address(&printed_a, "udp "), address(&printed_b, "udp "));
    let out = tscf(&["netcheck", "--server", &udp_a, "--stun", &udp_b, "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let report = &json_lines(&text(&out.stdout))[0];
    let servers = report["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2, "{report}");
    assert_eq!(servers[0]["server"], udp_a.as_str());
    assert_eq!(servers[1]["server"], udp_b.as_str());
    // No NAT on loopback: both see the socket's own address, which is the public one.
    assert_eq!(servers[0]["mapped"], servers[1]["mapped"], "{report}");
    assert_eq!(report["public"], servers[0]["mapped"]);
    assert_eq!(report["host"], report["public"]);
    assert_eq!(report["mapping_varies_by_destination"], false);
    assert_eq!(report["behind_nat"], false);
    assert_eq!(report["host_usable"], false, "loopback is no LAN address");

    let out = tscf(&["netcheck", "--server", &udp_a]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.contains("public address: 127.0.0.1:"), "{stdout}");
    assert!(
        stdout.contains("varies by destination: unknown"),
        "{stdout}"
    );

    // Nobody answers on a port that was just free: exit 1 after the retransmissions.
    let free = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent = free.local_addr().unwrap().to_string();
    drop(free);
    let out = tscf(&["netcheck", "--stun", &silent, "--json"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let report = &json_lines(&text(&out.stdout))[0];
    assert_eq!(report["servers"][0]["timed_out"], true);
    assert!(report["public"].is_null());
    for s in [&mut a, &mut b] {
        s.kill().unwrap();
        s.wait().unwrap();
    }
}

#[test]
fn client_asks_the_stun_servers_it_is_given() {
    let (mut a, printed_a) = spawn_server("stun-a", "", "8");
    let (mut b, printed_b) = spawn_server("stun-b", "", "8");
    let (udp_a, udp_b) = (address(&printed_a, "udp "), address(&printed_b, "udp "));
    // Without --stun only the server's responder is asked: one answer, no verdict.
    let out = tscf(&["client", "--server", &udp_a, "--for", "1", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    let nat = lines
        .iter()
        .find(|l| l["event"] == "nat_discovered")
        .expect("nat discovery reported");
    assert_eq!(nat["public"], lines[0]["observed"]);
    assert!(nat["varies_by_destination"].is_null(), "{nat}");

    // Two STUN servers, one from the configuration file and one on the command line.
    let path = config_file("client-stun", &format!("stun = [\"{udp_b}\"]\n"));
    let out = tscf(&[
        "client",
        "--server",
        &udp_a,
        "--config",
        path.to_str().unwrap(),
        "--stun",
        &udp_a,
        "--for",
        "1",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    let nat = lines
        .iter()
        .find(|l| l["event"] == "nat_discovered")
        .expect("nat discovery reported");
    assert_eq!(nat["varies_by_destination"], false, "{nat}");

    // A STUN server that never answers: no public address, and the client says what that
    // means for peer tunnels.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap().to_string();
    let out = tscf(&[
        "client",
        "--server",
        &udp_a,
        "--stun",
        &silent_addr,
        "--for",
        "2",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    let nat = lines
        .iter()
        .find(|l| l["event"] == "nat_discovered")
        .expect("nat discovery reported");
    assert!(nat["public"].is_null(), "{nat}");
    let hint = nat["hint"]
        .as_str()
        .unwrap_or_else(|| panic!("no hint: {nat}"));
    assert!(
        hint.contains("limited to this host's local addresses"),
        "{hint}"
    );

    let path = config_file("client-bad", "stun = [\"nowhere\"]\n");
    let out = tscf(&["client", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("stun"), "{}", text(&out.stderr));
    for s in [&mut a, &mut b] {
        s.kill().unwrap();
        s.wait().unwrap();
    }
}

/// The admin address a `tscf client --json --admin` printed.
fn admin_of(lines: &[serde_json::Value]) -> String {
    lines
        .iter()
        .find(|l| l["event"] == "admin")
        .and_then(|l| l["addr"].as_str())
        .unwrap_or_else(|| panic!("no admin line in {lines:?}"))
        .to_owned()
}

#[test]
fn ping_through_a_running_client_takes_the_relay_then_the_peer_tunnel() {
    let (mut server, printed) = spawn_server("ping", "", "10");
    let udp = address(&printed, "udp ");
    let (mut a, a_lines, _) = spawn_client(&[
        "--server",
        &udp,
        "--admin",
        "127.0.0.1:0",
        "--for",
        "6",
        "--forward",
        "127.0.0.1:0=10.77.0.3:5004",
    ]);
    let (mut b, _, _) = spawn_client(&[
        "--server",
        &udp,
        "--for",
        "6",
        "--forward",
        "127.0.0.1:0=10.77.0.2:5004",
    ]);
    let admin = admin_of(&a_lines);
    let out = tscf(&[
        "ping",
        "10.77.0.3",
        "--admin",
        &admin,
        "--until-direct",
        "-c",
        "50",
        "--interval",
        "0.05",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines = json_lines(&text(&out.stdout));
    let pongs: Vec<_> = lines.iter().filter(|l| l["event"] == "pong").collect();
    // The first ping asks for the peer tunnel and takes the relay; the last came back over it.
    assert_eq!(pongs[0]["path"], "relay", "{lines:?}");
    assert_eq!(pongs[0]["seq"], 1);
    let last = pongs.last().unwrap();
    assert_eq!(last["path"], "peer", "{lines:?}");
    assert_eq!(
        last["transport"], "dtls",
        "DTLS is the default peer transport"
    );
    assert!(last["peer_addr"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(last["rtt_ms"].as_f64().unwrap() > 0.0);
    let done = lines.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(done["direct"], true);
    assert_eq!(done["received"], pongs.len());

    // As text, a fixed count.
    let out = tscf(&[
        "ping",
        "10.77.0.3",
        "--admin",
        &admin,
        "-c",
        "2",
        "--interval",
        "0.01",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("pong from 10.77.0.3 via peer tunnel 127.0.0.1:"),
        "{stdout}"
    );
    assert!(stdout.contains("2 sent, 2 received"), "{stdout}");

    // Nobody holds 10.77.0.99: every ping times out, exit 1.
    let out = tscf(&[
        "ping",
        "10.77.0.99",
        "--admin",
        &admin,
        "-c",
        "1",
        "--timeout",
        "0.2",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stdout).contains("timeout (seq 1)"),
        "{}",
        text(&out.stdout)
    );
    assert!(text(&out.stderr).contains("no reply"));

    // A request the endpoint does not know.
    let mut stream = std::net::TcpStream::connect(&admin).unwrap();
    stream.write_all(b"status\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(stream)
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("\"error\""), "{line}");

    // From a tunnel of its own (10.77.0.4), to the first client's echo port.
    let out = tscf(&[
        "ping",
        "10.77.0.2",
        "--server",
        &udp,
        "-c",
        "2",
        "--interval",
        "0.05",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("2 sent, 2 received"));
    for c in [&mut a, &mut b] {
        assert_eq!(c.wait().unwrap().code(), Some(0));
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn ping_and_capture_usage_errors() {
    let out = tscf(&["ping", "10.77.0.3", "-c", "0"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["ping", "10.77.0.3", "--interval", "-1"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["ping", "not-an-address"]);
    assert_eq!(out.status.code(), Some(2));
    let out = tscf(&["client", "--admin", "192.0.2.1:4450", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("loopback"));
    let out = tscf(&["server", "--pcap-envelopes", "--for", "1"]);
    assert_eq!(out.status.code(), Some(2), "--pcap-envelopes needs --pcap");
    let path = config_file("bad-metrics", "metrics = \"nowhere\"\n");
    let out = tscf(&["server", "--config", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("metrics"));
    let out = tscf(&[
        "server",
        "--pcap",
        "/nonexistent/dir/x.pcapng",
        "--for",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("packet capture"));
}

/// One HTTP exchange: `request` sent as is, the whole answer read.
fn http(addr: &str, request: &[u8]) -> String {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream.write_all(request).unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut stream, &mut answer).unwrap();
    answer
}

#[test]
fn metrics_endpoints_answer_get_metrics() {
    let (mut server, printed) = spawn_server("metrics", "metrics = \"127.0.0.1:0\"\n", "6");
    let url = address(&printed, "metrics ");
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let udp = address(&printed, "udp ");
    let (mut client, lines, _) = spawn_client(&[
        "--server",
        &udp,
        "--metrics",
        "127.0.0.1:0",
        "--for",
        "3",
        "--forward",
        "127.0.0.1:0=10.77.0.3:5004",
    ]);
    let server_answer = http(&addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = &server_answer;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.contains("Content-Type: text/plain; version=0.0.4"));
    assert!(answer.contains("\ntscf_server_tunnels{state=\"active\",transport=\"udp\"} 1\n"));
    assert!(answer.contains("\ntscf_server_configuration_exchanges_total{result=\"ok\"} 1\n"));
    assert!(answer.contains("\ntscf_server_dropped_total{reason=\"spoofed_source\"} 0\n"));
    assert!(answer.contains("# TYPE tscf_server_relayed_frames_total counter"));
    let answer = http(&addr, b"GET / HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    let answer = http(&addr, b"POST /metrics HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    huge.resize(20_000, b'a');
    let answer = http(&addr, &huge);
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let url = lines
        .iter()
        .find(|l| l["event"] == "metrics")
        .and_then(|l| l["url"].as_str())
        .unwrap()
        .to_owned();
    let addr = url
        .trim_start_matches("http://")
        .trim_end_matches("/metrics")
        .to_owned();
    let client_answer = http(&addr, b"GET /metrics HTTP/1.0\r\n\r\n");
    let answer = &client_answer;
    assert!(
        answer.contains("\ntscf_client_state{state=\"connected\"} 1\n"),
        "{answer}"
    );
    assert!(answer.contains("# TYPE tscf_client_peer_setup_seconds histogram"));
    assert!(answer.contains("\ntscf_client_peer_setup_seconds_bucket{le=\"+Inf\"} 0\n"));

    // Every metric the example dashboard queries is one the programs serve.
    let dashboard = include_str!("../../docs/grafana-dashboard.json");
    let served = format!("{server_answer}{client_answer}");
    let mut names: Vec<&str> = dashboard
        .match_indices("tscf_")
        .map(|(i, _)| {
            let rest = &dashboard[i..];
            let end = rest
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .filter(|name| name.starts_with("tscf_server_") || name.starts_with("tscf_client_"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert!(names.len() > 15, "{names:?}");
    for name in names {
        let family = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|suffix| name.strip_suffix(suffix))
            .unwrap_or(name);
        assert!(
            served.contains(&format!("# TYPE {family} ")),
            "{name} is not served"
        );
    }
    assert_eq!(client.wait().unwrap().code(), Some(0));
    server.kill().unwrap();
    server.wait().unwrap();
}

/// A server that restarts has lost every tunnel: the client's keepalive is answered Tunnel Not
/// Found, its re-attach too, and it takes a fresh tunnel, saying so in words and with the
/// addresses, old and new.
#[test]
fn a_client_whose_server_lost_its_tunnel_says_so_and_prints_the_new_addresses() {
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let path = config_file(
        "restart",
        &format!("udp = [\"127.0.0.1:{port}\"]\nadmin = \"\"\n"),
    );
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_tscf"))
            .args(["server", "--for", "30", "--config", path.to_str().unwrap()])
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut first = start();
    let server = format!("127.0.0.1:{port}");
    let mut client = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .args(["client", "--server", &server, "--keepalive", "5", "--json"])
        .args(["--connect-timeout", "10", "--for", "30"])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(client.stdout.take().unwrap());
    let mut next = || {
        let mut line = String::new();
        assert!(stdout.read_line(&mut line).unwrap() > 0, "the client ended");
        serde_json::from_str::<serde_json::Value>(&line).unwrap()
    };
    let connected = next();
    assert_eq!(connected["event"], "connected", "{connected}");
    first.kill().unwrap();
    first.wait().unwrap();
    let mut second = start();
    let fresh = loop {
        let line = next();
        if line["event"] == "new_tunnel" {
            break line;
        }
    };
    let message = fresh["message"].as_str().unwrap();
    assert!(
        message.contains("the server no longer held the tunnel"),
        "{message}"
    );
    assert_eq!(fresh["old_ipv4"], connected["ipv4"]);
    let line = next();
    assert_eq!(line["event"], "connected", "{line}");
    assert_ne!(line["tunnel_id"], connected["tunnel_id"]);
    assert_eq!(line["ipv4"], fresh["ipv4"]);
    assert!(
        line["ipv4"].is_string() && line["ipv6"].is_string(),
        "{line}"
    );
    client.kill().unwrap();
    client.wait().unwrap();
    second.kill().unwrap();
    second.wait().unwrap();
}

/// The `[cluster]` table of director `name`, with its files in `dir` and its registry at `url`.
fn cluster_table(name: &str, dir: &std::path::Path, url: &str) -> String {
    let file = |f: &str| dir.join(f).display().to_string();
    let mesh = redis::free_port();
    format!(
        "[cluster]\nname = \"{name}\"\nredis = \"{url}\"\nsecret_file = {:?}\n\
         mesh = \"127.0.0.1:{mesh}\"\nca = {:?}\ncert = {:?}\nkey = {:?}\nheartbeat_ms = 300\n",
        file("secret"),
        file("ca.pem"),
        file(&format!("{name}.pem")),
        file(&format!("{name}.key")),
    )
}

#[test]
fn a_client_of_a_cluster_reattaches_to_another_director_when_its_own_dies() {
    // Over TCP the client notices dir-a's death when the connection is reset.
    if let Some(took) = reattach_when_the_director_dies("tcp") {
        println!("over TCP, re-attached {took:?} after the director was killed");
    }
}

#[test]
fn a_client_of_a_cluster_reattaches_over_udp_when_its_director_goes_silent() {
    // Over UDP nothing says that dir-a died: the client's pings make it probe the director
    // after half a second of silence, and the probe, then one re-attach at dir-a, each fail
    // after three transmissions (1.75 s) before dir-b is tried.
    if let Some(took) = reattach_when_the_director_dies("udp") {
        println!("over UDP, re-attached {took:?} after the director was killed");
    }
}

/// A client over `transport` ("tcp" or "udp") lists dir-a then dir-b; dir-a dies without a
/// word and dir-b adopts the tunnel when the client re-attaches there. Over UDP the client
/// pings its own address meanwhile, through its admin endpoint. How long the client took,
/// from the kill to its `reattached` line; `None` without Redis.
fn reattach_when_the_director_dies(transport: &str) -> Option<Duration> {
    let registry = redis::RedisServer::start(None)?;
    let dir = redis::TempDir::new();
    redis::write_cluster_files(&dir.0);
    std::fs::write(dir.0.join("secret"), "5a".repeat(32)).unwrap();
    // Config files are named per test process: one pair per transport, as tests run at once.
    let (mut a, printed_a) = spawn_server(
        &format!("cluster-{transport}-a"),
        &cluster_table("dir-a", &dir.0, &registry.url()),
        "150",
    );
    let (mut b, printed_b) = spawn_server(
        &format!("cluster-{transport}-b"),
        &cluster_table("dir-b", &dir.0, &registry.url()),
        "150",
    );
    assert!(printed_a.contains("mesh 127.0.0.1:"), "{printed_a}");

    let prefix = format!("{transport} ");
    let mut client = Command::new(env!("CARGO_BIN_EXE_tscf"))
        .args(["client", "--json", "--for", "150", "--transport", transport])
        .args(["--admin", "127.0.0.1:0"])
        .args(["--server", &address(&printed_a, &prefix)])
        .args(["--server", &address(&printed_b, &prefix)])
        .env_remove("RUST_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(client.stdout.take().unwrap());
    let (tx, events) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let event: serde_json::Value = serde_json::from_str(&line).unwrap();
            if tx.send(event).is_err() {
                return;
            }
        }
    });
    let next = |wanted: &str| -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = events
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no {wanted} event: {e}"));
            assert_ne!(event["event"], "new_tunnel", "the tunnel was lost: {event}");
            if event["event"] == wanted {
                return event;
            }
        }
    };
    let connected = next("connected");
    let admin = next("admin")["addr"].as_str().unwrap().to_owned();
    // The tunnel's record reaches the registry just after the tunnel opens: a director that
    // dies before it is written loses the tunnel for good.
    let id = connected["tunnel_id"].as_u64().unwrap();
    smol::block_on(async {
        let mut store = tscf_runtime_smol::RedisRegistry::new(&registry.url(), "default").unwrap();
        let get = tscf_runtime_smol::core::cluster::RegistryRequest::GetTunnel { id };
        let deadline = Instant::now() + redis::BOUND;
        while !matches!(
            store.execute(&get).await,
            tscf_runtime_smol::core::cluster::RegistryResponse::Tunnel(Some(_))
        ) {
            assert!(Instant::now() < deadline, "no record of tunnel {id}");
            smol::Timer::after(Duration::from_millis(20)).await;
        }
    });

    if transport == "udp" {
        // Pings to the client's own address, through dir-a and back, one every 100 ms even
        // unanswered (each waits 100 ms); the first reply says that traffic flows.
        let own = connected["ipv4"].as_str().unwrap();
        let mut stream = std::net::TcpStream::connect(&admin).unwrap();
        writeln!(stream, "ping {own} 10000 0 100 100").unwrap();
        let mut replies = std::io::BufReader::new(stream).lines();
        let first = replies.next().unwrap().unwrap();
        assert!(first.contains("\"pong\""), "{first}");
        std::thread::spawn(move || replies.map_while(Result::ok).for_each(drop));
    }

    // dir-a dies without a word; dir-b adopts the tunnel when the client re-attaches there.
    a.kill().unwrap();
    let killed = Instant::now();
    a.wait().unwrap();
    let reattached = next("reattached");
    let took = killed.elapsed();
    assert_eq!(
        reattached["tunnel_id"], connected["tunnel_id"],
        "{reattached}"
    );
    assert_eq!(reattached["ipv4"], connected["ipv4"], "{reattached}");
    let status = tscf(&[
        "status",
        "--json",
        "--admin",
        &address(&printed_b, "admin "),
    ]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["director"]["cluster"]["adoptions"], 1, "{status}");

    client.kill().unwrap();
    client.wait().unwrap();
    b.kill().unwrap();
    b.wait().unwrap();
    Some(took)
}
