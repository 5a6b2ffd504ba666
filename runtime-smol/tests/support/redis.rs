//! A `redis-server` of a test's own on a loopback port, and the PEM files of a cluster: what
//! the tests of a cluster share.
//!
//! `redis-server` comes from `scripts/lab-deps`; without it a test fails saying so, unless
//! `TSCF_SKIP_REDIS=1`, under which it is skipped.
#![allow(dead_code)]

use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How long a test waits for a condition before it fails.
pub(crate) const BOUND: Duration = Duration::from_secs(20);

/// A `redis-server` on a loopback port, killed on drop.
pub(crate) struct RedisServer {
    child: Child,
    pub(crate) port: u16,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts one, on `port` or a free one; `None` when the tests are to be skipped.
    pub(crate) fn start(port: Option<u16>) -> Option<Self> {
        Self::launch(port.unwrap_or_else(free_port), None, &[])
    }

    /// Starts a replica of the server on loopback port `master`.
    pub(crate) fn start_replica(master: u16) -> Option<Self> {
        let master = master.to_string();
        Self::launch(free_port(), None, &["--replicaof", "127.0.0.1", &master])
    }

    /// Starts a sentinel that watches the master on loopback port `master` under the name
    /// `name`, alone (a quorum of 1), taking it for down after 500 ms without an answer.
    pub(crate) fn start_sentinel(master: u16, name: &str) -> Option<Self> {
        let conf = format!(
            "sentinel monitor {name} 127.0.0.1 {master} 1\n\
             sentinel down-after-milliseconds {name} 500\n\
             sentinel failover-timeout {name} 2000\n"
        );
        Self::launch(free_port(), Some(&conf), &["--sentinel"])
    }

    /// Starts `redis-server` on `port`, with a configuration file holding `conf` (a
    /// sentinel rewrites its own) and `extra` arguments; `None` when the tests are to be
    /// skipped.
    fn launch(port: u16, conf: Option<&str>, extra: &[&str]) -> Option<Self> {
        if !on_path("redis-server") {
            if std::env::var("TSCF_SKIP_REDIS").as_deref() == Ok("1") {
                eprintln!("skipped: redis-server is not installed (TSCF_SKIP_REDIS=1)");
                return None;
            }
            panic!(
                "redis-server is not installed: run scripts/lab-deps \
                 (or set TSCF_SKIP_REDIS=1 to skip these tests)"
            );
        }
        let dir = TempDir::new();
        let mut command = Command::new("redis-server");
        if let Some(conf) = conf {
            let path = dir.0.join("redis.conf");
            std::fs::write(&path, conf).expect("a configuration file");
            command.arg(path);
        }
        let child = command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("redis-server starts");
        let server = Self {
            child,
            port,
            _dir: dir,
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + BOUND;
        while TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not listen on {addr}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(server)
    }

    /// Kills it at once (`SIGKILL`), as a crash would.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl TempDir {
    pub(crate) fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let unique = format!("tscf-registry-{}-{n}", std::process::id());
        let path = std::env::temp_dir().join(unique);
        std::fs::create_dir_all(&path).expect("a temporary directory");
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

pub(crate) fn free_port() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("a free port");
    listener.local_addr().expect("its address").port()
}

/// The PEM files of a cluster CA and of directors `dir-a` and `dir-b`, in `dir`.
pub(crate) fn write_cluster_files(dir: &Path) {
    let ca_key = rcgen::KeyPair::generate().expect("a key");
    let mut ca_params = rcgen::CertificateParams::new(vec![]).expect("no names");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("a CA");
    std::fs::write(dir.join("ca.pem"), ca.pem()).expect("written");
    for director in ["dir-a", "dir-b"] {
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(vec![director.to_owned()])
            .expect("a name")
            .signed_by(&key, &ca)
            .expect("a certificate");
        std::fs::write(dir.join(format!("{director}.pem")), cert.pem()).expect("written");
        std::fs::write(dir.join(format!("{director}.key")), key.serialize_pem()).expect("written");
    }
}
