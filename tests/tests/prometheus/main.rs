//! A real Prometheus scrapes the real `tscf server` and two `tscf client`s on loopback while the
//! clients ping each other over the relay and then over a peer tunnel; the values come back
//! through Prometheus's HTTP query API (`/api/v1/query`).
//!
//! Needs `prometheus` (Debian's package; `scripts/lab-deps` installs it) and the `tscf` binary
//! (`cargo test --workspace` builds it); without them the test says why and passes, unless
//! `CI=true`.
#![allow(missing_docs, clippy::unwrap_used)]

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tscf_tests::program::{self, http_get, json_field, query_escape};

/// How long Prometheus may take to start, and a value to show up in it.
const DEADLINE: Duration = Duration::from_secs(60);

fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Prometheus test cannot run (CI=true): {why}");
    }
    let _ = writeln!(std::io::stderr(), "Prometheus test skipped: {why}");
}

#[test]
fn prometheus_scrapes_a_server_carrying_relay_and_peer_traffic() {
    let Some(prometheus) = tscf_tests::lab::which("prometheus") else {
        skip("`prometheus` not found (scripts/lab-deps installs it)");
        return;
    };
    if let Err(e) = tscf_tests::lab::tscf_binary() {
        skip(&e);
        return;
    }
    let dir = TempDir::new();
    let server = program::server(dir.path(), "", &["--metrics", "127.0.0.1:0"]).unwrap();
    let udp = server.after("udp ");
    let server_metrics = address(&server.after("metrics "));
    let common = [
        "--server",
        &udp,
        "--peer",
        "--metrics",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    ];
    // The first client gets 10.77.0.2, the second 10.77.0.3.
    let a = program::client("client a", &common, "admin").unwrap();
    let b = program::client("client b", &common, "admin").unwrap();
    assert_eq!(json_field(&a, "connected", "ipv4"), "10.77.0.2");
    let a_metrics = address(&json_field(&a, "metrics", "url"));
    let b_metrics = address(&json_field(&b, "metrics", "url"));

    // The first ping takes the relay and asks for a peer tunnel; the pings stop at the first
    // answer over it.
    let ping = Command::new(tscf_tests::lab::tscf_binary().unwrap())
        .args(["ping", "10.77.0.3", "--until-direct", "-c", "100"])
        .args(["--interval", "0.05", "--json", "--admin"])
        .arg(json_field(&a, "admin", "addr"))
        .output()
        .unwrap();
    let lines = String::from_utf8_lossy(&ping.stdout).into_owned();
    assert!(
        ping.status.success(),
        "{lines}{}",
        String::from_utf8_lossy(&ping.stderr)
    );
    assert!(
        lines.lines().next().unwrap().contains("\"path\":\"relay\""),
        "{lines}"
    );

    let prometheus = Prometheus::start(
        &prometheus,
        dir.path(),
        server_metrics,
        [a_metrics, b_metrics],
    );
    prometheus.wait_for("up{job=\"tscf-server\"}", |v| v == 1.0);
    // Two UDP tunnels, both configured with success, introduced to each other.
    prometheus.wait_for(
        "tscf_server_tunnels{state=\"active\",transport=\"udp\"}",
        |v| v == 2.0,
    );
    prometheus.wait_for(
        "tscf_server_configuration_exchanges_total{result=\"ok\"}",
        |v| v == 2.0,
    );
    prometheus.wait_for(
        "tscf_server_peer_negotiations_total{outcome=\"introduced\"}",
        |v| v >= 1.0,
    );
    // The first ping and its answer were relayed.
    prometheus.wait_for("tscf_server_relayed_frames_total", |v| v >= 1.0);
    prometheus.wait_for("tscf_server_relayed_bytes_total", |v| v >= 37.0);
    // Every drop reason is a series of its own, all zero here.
    prometheus.wait_for("count(tscf_server_dropped_total)", |v| v >= 12.0);
    prometheus.wait_for("sum(tscf_server_dropped_total)", |v| v == 0.0);
    // Both clients hold a peer tunnel over DTLS (the default), and their setup times are in
    // the histogram.
    prometheus.wait_for(
        "sum(tscf_client_peer_tunnels{job=\"tscf-client\",transport=\"dtls\"})",
        |v| v == 2.0,
    );
    prometheus.wait_for("sum(tscf_client_peer_setup_seconds_count)", |v| v == 2.0);
    prometheus.wait_for(
        "sum(tscf_client_peer_setup_seconds_bucket{le=\"10\"})",
        |v| v == 2.0,
    );
    prometheus.wait_for(
        "sum(tscf_client_peer_negotiations_total{outcome=\"up\"})",
        |v| v == 2.0,
    );
    // The last ping went over the peer tunnel.
    let instance = a_metrics.to_string();
    prometheus.wait_for(
        &format!(
            "tscf_client_data_envelopes_total{{instance=\"{instance}\",path=\"peer\",direction=\"sent\"}}"
        ),
        |v| v >= 1.0,
    );
    prometheus.wait_for(
        &format!("tscf_client_state{{instance=\"{instance}\",state=\"connected\"}}"),
        |v| v == 1.0,
    );

    assert_eq!(a.stop(Duration::from_secs(10)), Some(0));
    assert_eq!(b.stop(Duration::from_secs(10)), Some(0));
    // Once the clients are gone the server holds no tunnel.
    prometheus.wait_for("sum(tscf_server_tunnels)", |v| v == 0.0);
    assert_eq!(server.stop(Duration::from_secs(10)), Some(0));
}

fn address(text: &str) -> SocketAddr {
    let host = text
        .trim_start_matches("http://")
        .trim_end_matches("/metrics");
    host.parse()
        .unwrap_or_else(|_| panic!("not an address: {text}"))
}

/// A Prometheus process with a configuration and a data directory of its own.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping the server and the clients every 250 ms, and waits until
    /// it is ready.
    fn start(program: &Path, dir: &Path, server: SocketAddr, clients: [SocketAddr; 2]) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 250ms\n  scrape_timeout: 200ms\n\
                 scrape_configs:\n\
                 \x20 - job_name: tscf-server\n    static_configs:\n      - targets: ['{server}']\n\
                 \x20 - job_name: tscf-client\n    static_configs:\n      - targets: ['{}', '{}']\n",
                clients[0], clients[1]
            ),
        )
        .unwrap();
        // A port that was free a moment ago.
        let addr = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = Command::new(program)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let prometheus = Self { child, addr };
        prometheus.poll("ready", |p| {
            http_get(p.addr, "/-/ready").is_ok_and(|(status, _)| status == 200)
        });
        prometheus
    }

    /// Polls the query API until `expr` has one value and `check` accepts it.
    fn wait_for(&self, expr: &str, check: impl Fn(f64) -> bool) {
        let mut last = String::new();
        let target = format!("/api/v1/query?query={}", query_escape(expr));
        let found = self.poll_result(|p| match http_get(p.addr, &target) {
            Ok((200, body)) => {
                let value = one_value(&body);
                last = body;
                value.is_some_and(&check)
            }
            Ok((status, body)) => {
                last = format!("{status}: {body}");
                false
            }
            Err(e) => {
                last = e.to_string();
                false
            }
        });
        assert!(
            found,
            "{expr}: not as expected within {DEADLINE:?}; last answer {last}"
        );
    }

    fn poll(&self, what: &str, mut done: impl FnMut(&Self) -> bool) {
        assert!(
            self.poll_result(&mut done),
            "Prometheus not {what} within {DEADLINE:?}"
        );
    }

    /// Asks `done` until it says yes or the deadline passes, a few times a second: Prometheus
    /// offers nothing to wait on.
    fn poll_result(&self, mut done: impl FnMut(&Self) -> bool) -> bool {
        let deadline = Instant::now() + DEADLINE;
        while Instant::now() < deadline {
            if done(self) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of a query answer with exactly one sample.
fn one_value(body: &str) -> Option<f64> {
    let answer: Value = serde_json::from_str(body).ok()?;
    let result = answer["data"]["result"].as_array()?;
    let [sample] = result.as_slice() else {
        return None;
    };
    sample["value"][1].as_str()?.parse().ok()
}

/// A directory removed when the test passes (kept for a look when it fails).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("tscf-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
