//! The `tscf` program, run as a process.
#![allow(missing_docs, clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::{Command, Output};
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

fn config_file(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("tscf-cli-{}-{name}.toml", std::process::id()));
    std::fs::write(&path, text).unwrap();
    path
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
    let out = tscf(&["server", "--for", "1", "--config", path.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
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
fn server_with_the_default_configuration() {
    // The default ports are fixed; another program may hold them, which is a runtime failure.
    let out = tscf(&["server", "--for", "1"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    match out.status.code() {
        Some(0) => {
            assert!(stdout.contains("tcp 127.0.0.1:4440"), "{stdout}");
            assert!(stdout.contains("tls 127.0.0.1:4443"), "{stdout}");
            assert!(stdout.contains("udp 127.0.0.1:4440"), "{stdout}");
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
}

#[test]
fn server_stops_cleanly_at_sigterm() {
    let path = config_file("sigterm", "udp = [\"127.0.0.1:0\"]\n");
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
