//! The Wireshark dissector `contrib/wireshark/tscf.lua`, run by tshark over captures these tests
//! make (pcap files written with pcap-file), over a live capture of a TLS tunnel, and over the
//! captures the `tscf` program writes itself (`--pcap`): the decoded field names and values
//! must be what was sent. Needs `tshark` (`scripts/lab-deps` installs
//! it); without it every test says why and passes, unless `CI=true`.
#![allow(missing_docs, clippy::unwrap_used, unreachable_pub)]

mod capture;
mod pdml;
mod program;
mod streams;
mod tls;
mod vectors;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use pdml::Packet;

/// The dissector under test.
pub fn dissector() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../contrib/wireshark/tscf.lua")
}

/// Says why a test cannot run and lets it pass, or fails it under `CI=true`.
pub fn skip(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Wireshark dissector tests cannot run (CI=true): {why}");
    }
    // Straight to standard error, past the test harness's capture, so that a skip shows.
    let _ = writeln!(std::io::stderr(), "Wireshark dissector test skipped: {why}");
}

/// tshark, and a directory for one test's captures, removed when the test passes (kept for a
/// look when it fails). tshark's configuration directory is in it, so that no user preference
/// applies.
pub struct Tshark {
    program: PathBuf,
    dir: PathBuf,
}

impl Tshark {
    /// tshark if installed; otherwise [`skip`] and `None`.
    pub fn find() -> Option<Self> {
        static N: AtomicU64 = AtomicU64::new(0);
        let Some(program) = tscf_tests::lab::which("tshark") else {
            skip("`tshark` not found (scripts/lab-deps installs it)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "tscf-wireshark-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(dir.join("config")).unwrap();
        Some(Self { program, dir })
    }

    /// The test's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A tshark command with the dissector loaded.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.env("WIRESHARK_CONFIG_DIR", self.dir.join("config"))
            .arg("-n")
            .arg("-X")
            .arg(format!("lua_script:{}", dissector().display()));
        cmd
    }

    /// Dissects `file` in two passes (so that a request links forward to its response) with
    /// the extra `options`; the packets in order. Fails on a Lua error.
    pub fn dissect(&self, file: &Path, options: &[&str]) -> Vec<Packet> {
        let out = self
            .command()
            .arg("-2")
            .arg("-r")
            .arg(file)
            .args(options)
            .args(["-T", "pdml"])
            .output()
            .expect("tshark runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success() && !stderr.contains("Lua: Error"),
            "tshark failed on {}: {}\n{stderr}",
            file.display(),
            out.status
        );
        let packets = pdml::parse(&String::from_utf8_lossy(&out.stdout));
        for (i, p) in packets.iter().enumerate() {
            let errors = p.errors();
            assert!(
                errors.is_empty(),
                "frame {}: the dissector failed: {errors:?}\n{p}",
                i + 1
            );
        }
        packets
    }
}

impl Drop for Tshark {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// How tshark shows a bytes field: `73:33:63`.
pub fn bytes_shown(bytes: &[u8]) -> String {
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}
