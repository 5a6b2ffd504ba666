//! A NAT lab in Linux network namespaces: a public network with the tunnel server and a STUN
//! server, client sites behind NAT routers made with nftables, and the real `tscf` program
//! and `turnserver` (coturn) running inside them.
//!
//! ```text
//!                      public namespace (bridge, 203.0.113.0/24)
//!          203.0.113.1 tscf server      203.0.113.2 STUN server (coturn)
//!             |                    |                     |
//!     router 203.0.113.11   router 203.0.113.12   router 203.0.113.13 …   (one per site)
//!       masquerade            masquerade            masquerade fully-random
//!     LAN 192.168.10.0/24   LAN 192.168.11.0/24   LAN 192.168.12.0/24
//!      client  client         client                client
//! ```
//!
//! Hosts of their own on the public network ([`Lab::add_public_host`], 203.0.113.20 and up)
//! carry servers that must be machines apart: the directors of a cluster and their registry.
//!
//! Every name carries a prefix made from the process id and a per-lab letter, so labs of one
//! test run (tests run in parallel) and of different runs never meet; interfaces get short
//! names of their own (at most 15 characters). Dropping the [`Lab`] stops every process it
//! started and deletes its namespaces, also when a test panics; [`Lab::new`] first removes
//! namespaces left by an earlier run whose process is gone. See `docs/DESIGN.md` ("The NAT
//! lab") for how the NAT kinds are built.

mod media;
mod process;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

pub use media::{Media, MediaStats};
pub use process::{Event, Proc};

use process::Children;

/// What every lab namespace's name starts with, so that stale ones can be found.
const NAMESPACE_PREFIX: &str = "tscflab-";
/// The tunnel server's public address.
pub const SERVER_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The STUN server's public address.
pub const STUN_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The admission token of the lab's tunnel servers (they listen beyond loopback).
pub const TOKEN: &str = "lab-admission-token";

/// Labs created by this process so far: the letter in the prefix.
static LABS: AtomicU32 = AtomicU32::new(0);

/// How a site's router maps and filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nat {
    /// `masquerade`: the source port is kept, so one mapping serves every destination
    /// (endpoint-independent mapping); conntrack lets in only answers from the exact address
    /// and port a packet went to (address- and port-dependent filtering, "port-restricted
    /// cone").
    PortRestricted,
    /// `masquerade fully-random`: every new flow, so every destination, gets a random port
    /// (address- and port-dependent mapping, "symmetric"); filtering as above.
    Symmetric,
}

impl fmt::Display for Nat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Nat::PortRestricted => "port-restricted",
            Nat::Symmetric => "symmetric",
        })
    }
}

/// Why the lab cannot run here.
#[derive(Debug)]
pub struct Unavailable(pub String);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A client site: a NAT router namespace and the client namespaces on its LAN.
#[derive(Clone, Debug)]
pub struct Site {
    /// The router's namespace.
    pub router: String,
    /// The router's public address.
    pub public_ip: Ipv4Addr,
    /// The router's interface on the public network.
    pub wan: String,
    /// How it maps and filters.
    pub nat: Nat,
    /// The clients' namespaces and LAN addresses.
    pub hosts: Vec<(String, Ipv4Addr)>,
}

/// A topology of namespaces and the processes running in it; removed on drop.
pub struct Lab {
    prefix: String,
    short: String,
    public: String,
    namespaces: Vec<String>,
    sites: usize,
    /// NAT rebindings so far ([`rebind`](Self::rebind)).
    rebinds: u16,
    children: Children,
    dir: PathBuf,
    /// This process's turn: one lab at a time (see [`Lab::new`]). Last, so that it is let go
    /// after the lab is torn down.
    _turn: MutexGuard<'static, ()>,
}

/// Whose turn it is to run a lab in this process.
static TURN: Mutex<()> = Mutex::new(());

impl Lab {
    /// Builds the public network (a bridge with [`SERVER_IP`] and [`STUN_IP`]), after
    /// removing namespaces of earlier runs that crashed. `Err` when this host cannot make
    /// namespaces (not root, no `ip`, no netns support), with the reason.
    ///
    /// Labs of one process take turns: the test harness runs tests on parallel threads, and
    /// two labs at once on a small machine starve each other's processes and turn their
    /// time bounds (a relay reached within 2 s, nothing lost across a switch) into a lottery.
    /// It waits until the lab before it is dropped.
    pub fn new() -> Result<Self, Unavailable> {
        if !rustix::process::geteuid().is_root() {
            return Err(Unavailable("not running as root".into()));
        }
        // A test that panicked while it held the turn leaves nothing to repair: its lab is
        // torn down by then.
        let turn = TURN.lock().unwrap_or_else(|e| e.into_inner());
        for program in ["ip", "nft", "conntrack"] {
            if which(program).is_none() {
                return Err(Unavailable(format!(
                    "`{program}` not found (scripts/lab-deps installs it)"
                )));
            }
        }
        remove_stale();
        let pid = std::process::id();
        let n = LABS.fetch_add(1, Ordering::Relaxed);
        let letter = char::from(b'a' + (n % 26) as u8);
        let prefix = format!("{NAMESPACE_PREFIX}{pid}-{letter}");
        // Interface names: 't', five digits of the pid, the letter, a role of at most 8.
        let short = format!("t{:05}{letter}", pid % 100_000);
        let dir = std::env::temp_dir().join(&prefix);
        std::fs::create_dir_all(&dir).map_err(|e| Unavailable(format!("{dir:?}: {e}")))?;
        let public = format!("{prefix}-pub");
        let mut lab = Lab {
            prefix,
            short,
            public: public.clone(),
            namespaces: Vec::new(),
            sites: 0,
            rebinds: 0,
            children: Children::default(),
            dir,
            _turn: turn,
        };
        lab.add_namespace(&public)
            .map_err(|e| Unavailable(format!("cannot create a network namespace: {e}")))?;
        let br = lab.ifname("br");
        lab.ip(&public, &["link", "add", &br, "type", "bridge"]);
        lab.ip(&public, &["link", "set", &br, "up"]);
        for ip in [SERVER_IP, STUN_IP] {
            lab.ip(&public, &["addr", "add", &format!("{ip}/24"), "dev", &br]);
        }
        Ok(lab)
    }

    /// The public namespace: the tunnel server and the STUN server run here.
    pub fn public(&self) -> &str {
        &self.public
    }

    /// The namespaces made so far, in order.
    pub fn namespaces(&self) -> &[String] {
        &self.namespaces
    }

    /// A directory for this lab's files, removed with it.
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// Adds a site: a router with public address 203.0.113.(11 + n) doing `nat`, and `hosts`
    /// client namespaces on its LAN 192.168.(10 + n).0/24 (addresses .10, .11, …).
    pub fn add_site(&mut self, nat: Nat, hosts: usize) -> Site {
        let n = self.sites;
        self.sites += 1;
        let router = format!("{}-r{n}", self.prefix);
        self.must_add_namespace(&router);
        let public_ip = Ipv4Addr::new(203, 0, 113, 11 + n as u8);
        let lan_net = 10 + n as u8;
        // WAN: a veth from the router to the public bridge.
        let wan = self.ifname(&format!("w{n}"));
        let port = self.ifname(&format!("p{n}"));
        let (public, br) = (self.public.clone(), self.ifname("br"));
        self.veth(&router, &wan, &public, &port);
        self.ip(&public, &["link", "set", &port, "master", &br]);
        self.ip(&public, &["link", "set", &port, "up"]);
        self.ip(&router, &["link", "set", &wan, "up"]);
        self.ip(
            &router,
            &["addr", "add", &format!("{public_ip}/24"), "dev", &wan],
        );
        // LAN: a bridge in the router, one veth per host.
        let lan = self.ifname(&format!("l{n}"));
        self.ip(&router, &["link", "add", &lan, "type", "bridge"]);
        self.ip(&router, &["link", "set", &lan, "up"]);
        self.ip(
            &router,
            &[
                "addr",
                "add",
                &format!("192.168.{lan_net}.1/24"),
                "dev",
                &lan,
            ],
        );
        self.run(&router, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        let masquerade = match nat {
            Nat::PortRestricted => "masquerade",
            Nat::Symmetric => "masquerade fully-random",
        };
        // Unsolicited UDP from outside is dropped at the router's input hook, before conntrack
        // confirms it: such a packet must not leave a conntrack entry that would make the
        // router pick another port for our own later packet to that sender.
        let rules = format!(
            "table ip nat {{\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 oifname \"{wan}\" {masquerade}\n\
               }}\n\
             }}\n\
             table inet filter {{\n\
               chain input {{\n\
                 type filter hook input priority filter; policy accept;\n\
                 iifname \"{wan}\" meta l4proto udp drop\n\
               }}\n\
               chain forward {{\n\
                 type filter hook forward priority filter; policy accept;\n\
                 iifname \"{wan}\" ct state new drop\n\
               }}\n\
             }}\n"
        );
        self.nft(&router, &rules);
        let mut site_hosts = Vec::new();
        for h in 0..hosts {
            let ns = format!("{}-c{n}{h}", self.prefix);
            self.must_add_namespace(&ns);
            let eth = self.ifname(&format!("e{n}{h}"));
            let port = self.ifname(&format!("q{n}{h}"));
            self.veth(&ns, &eth, &router, &port);
            self.ip(&router, &["link", "set", &port, "master", &lan]);
            self.ip(&router, &["link", "set", &port, "up"]);
            let addr = Ipv4Addr::new(192, 168, lan_net, 10 + h as u8);
            self.ip(&ns, &["link", "set", &eth, "up"]);
            self.ip(&ns, &["addr", "add", &format!("{addr}/24"), "dev", &eth]);
            self.ip(
                &ns,
                &[
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("192.168.{lan_net}.1"),
                ],
            );
            site_hosts.push((ns, addr));
        }
        Site {
            router,
            public_ip,
            wan,
            nat,
            hosts: site_hosts,
        }
    }

    /// Adds a host on the public network at `ip` (203.0.113.0/24, not one the lab uses): a
    /// namespace of its own on the bridge, without NAT, for a server that must be a machine
    /// apart (a director of a cluster, its registry). Its namespace's name.
    pub fn add_public_host(&mut self, ip: Ipv4Addr) -> String {
        let n = ip.octets()[3];
        let ns = format!("{}-h{n}", self.prefix);
        self.must_add_namespace(&ns);
        let eth = self.ifname(&format!("h{n}"));
        let port = self.ifname(&format!("b{n}"));
        let (public, br) = (self.public.clone(), self.ifname("br"));
        self.veth(&ns, &eth, &public, &port);
        self.ip(&public, &["link", "set", &port, "master", &br]);
        self.ip(&public, &["link", "set", &port, "up"]);
        self.ip(&ns, &["link", "set", &eth, "up"]);
        self.ip(&ns, &["addr", "add", &format!("{ip}/24"), "dev", &eth]);
        ns
    }

    /// Starts `program` in namespace `ns`; its standard output is read line by line into the
    /// returned [`Proc`]. Stopped (SIGKILL) when the lab is dropped, if still running.
    pub fn spawn(&mut self, ns: &str, program: &std::path::Path, args: &[String]) -> Proc {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.children
            .spawn(cmd, &format!("{} in {ns}", program.display()))
    }

    /// Stops a process with SIGTERM and waits for it (SIGKILL after 5 s); its exit code.
    pub fn terminate(&mut self, proc: &Proc) -> Option<i32> {
        self.children.terminate(proc)
    }

    /// Kills a process with SIGKILL, as a crash or a power cut would, and reaps it.
    pub fn kill(&mut self, proc: &Proc) {
        let _ = self.children.wait(proc, std::time::Duration::ZERO);
    }

    /// Waits for a process to exit by itself (SIGKILL after `timeout`); its exit code.
    pub fn wait(&mut self, proc: &Proc, timeout: std::time::Duration) -> Option<i32> {
        self.children.wait(proc, timeout)
    }

    /// Runs a command in `ns` and returns its output; panics if it cannot be started.
    pub fn run(&self, ns: &str, args: &[&str]) -> std::process::Output {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("ip netns exec {ns} {args:?}: {e}"));
        assert!(
            out.status.success() || args.first() == Some(&"conntrack"),
            "{ns}: {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Loads an nftables ruleset in `ns`.
    pub fn nft(&self, ns: &str, rules: &str) {
        let path = self.dir.join(format!("{ns}-{}.nft", rules.len()));
        if let Err(e) = std::fs::write(&path, rules) {
            panic!("{path:?}: {e}");
        }
        let file = path.to_string_lossy().into_owned();
        self.run(ns, &["nft", "-f", &file]);
    }

    /// Cuts the path between `site` and `other`: drops their UDP both ways at `site`'s router
    /// and deletes the conntrack entries (the NAT mappings) towards `other`.
    pub fn cut(&self, site: &Site, other: Ipv4Addr) {
        let rules = format!(
            "table inet cut {{\n\
               chain forward {{\n\
                 type filter hook forward priority filter - 10; policy accept;\n\
                 ip daddr {other} drop\n\
                 ip saddr {other} drop\n\
               }}\n\
             }}\n"
        );
        self.nft(&site.router, &rules);
        let other = other.to_string();
        self.run(&site.router, &["conntrack", "-D", "-d", &other]);
        self.run(&site.router, &["conntrack", "-D", "-s", &other]);
    }

    /// Removes what [`cut`](Self::cut) added.
    pub fn heal(&self, site: &Site) {
        self.run(&site.router, &["nft", "delete", "table", "inet", "cut"]);
    }

    /// Rebinds `site`'s NAT: its UDP mappings towards `to` (every UDP mapping when `None`) are
    /// forgotten, as a NAT that restarted or timed them out forgets them, and the next packet
    /// of each flow gets a new public port: from now on the router maps UDP into a port range
    /// of its own (`40000 + 1000 * n` to `+ 999` for the `n`th rebinding of the lab), so that
    /// the new port cannot be the old one. Other flows keep their mappings.
    pub fn rebind(&mut self, site: &Site, to: Option<Ipv4Addr>) {
        let n = self.rebinds % 20;
        self.rebinds += 1;
        let (low, high) = (40_000 + 1000 * n, 40_999 + 1000 * n);
        // Without `random` the router takes the first free port of the range, the same for
        // every destination of one local port: the mapping stays endpoint-independent.
        let random = match site.nat {
            Nat::PortRestricted => "",
            Nat::Symmetric => "fully-random",
        };
        let wan = &site.wan;
        let rules = format!(
            "flush chain ip nat postrouting\n\
             add rule ip nat postrouting oifname \"{wan}\" meta l4proto udp masquerade to \
             :{low}-{high} {random}\n\
             add rule ip nat postrouting oifname \"{wan}\" masquerade\n"
        );
        self.nft(&site.router, &rules);
        match to {
            Some(ip) => {
                let ip = ip.to_string();
                self.run(&site.router, &["conntrack", "-D", "-p", "udp", "-d", &ip]);
            }
            None => {
                self.run(&site.router, &["conntrack", "-D", "-p", "udp"]);
            }
        }
    }

    /// Sets how long `site`'s NAT keeps a UDP mapping without traffic, in seconds, whether or
    /// not it has seen answers (Linux's defaults are 30 s and 120 s).
    pub fn udp_timeout(&self, site: &Site, secs: u32) {
        let unreplied = format!("net.netfilter.nf_conntrack_udp_timeout={secs}");
        let stream = format!("net.netfilter.nf_conntrack_udp_timeout_stream={secs}");
        self.run(&site.router, &["sysctl", "-qw", &unreplied, &stream]);
    }

    fn ifname(&self, role: &str) -> String {
        let name = format!("{}{role}", self.short);
        debug_assert!(name.len() <= 15, "{name}");
        name
    }

    fn add_namespace(&mut self, ns: &str) -> Result<(), String> {
        let out = Command::new("ip")
            .args(["netns", "add", ns])
            .output()
            .map_err(|e| format!("`ip netns add`: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        self.namespaces.push(ns.to_owned());
        self.ip(ns, &["link", "set", "lo", "up"]);
        Ok(())
    }

    fn must_add_namespace(&mut self, ns: &str) {
        if let Err(e) = self.add_namespace(ns) {
            panic!("ip netns add {ns}: {e}");
        }
    }

    /// A veth pair created straight in the two namespaces, so nothing appears in the host's.
    fn veth(&self, ns_a: &str, a: &str, ns_b: &str, b: &str) {
        run_ip(&[
            "link", "add", a, "netns", ns_a, "type", "veth", "peer", "name", b, "netns", ns_b,
        ]);
    }

    fn ip(&self, ns: &str, args: &[&str]) {
        let mut all = vec!["-n", ns];
        all.extend_from_slice(args);
        run_ip(&all);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.children.kill_all();
        for ns in self.namespaces.iter().rev() {
            remove_namespace(ns);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A socket address on the public network.
pub fn public_addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

/// The `tscf` binary: `TSCF_BIN` if set, else next to this test executable's target
/// directory (`target/<profile>/tscf`, which `cargo test --workspace` and `scripts/lab`
/// build).
pub fn tscf_binary() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("TSCF_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(|e| format!("current executable: {e}"))?;
    // target/<profile>/deps/lab-<hash> → target/<profile>/tscf
    let candidate = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|profile| profile.join("tscf"));
    match candidate {
        Some(path) if path.is_file() => Ok(path),
        _ => Err(format!(
            "the tscf binary is not built next to {}; run `cargo build -p tscf-runtime-smol \
             --bin tscf` (scripts/lab does) or set TSCF_BIN",
            exe.display()
        )),
    }
}

/// `turnserver` (coturn), if installed.
pub fn turnserver() -> Option<PathBuf> {
    which("turnserver")
}

/// `program`'s path: the first match in `PATH`, then `/usr/sbin` and `/sbin`.
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Kills what still runs in `ns` and deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Some(pid) = pid.parse().ok().and_then(rustix::process::Pid::from_raw) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).output();
}

/// Removes lab namespaces whose creating process no longer runs (a crashed earlier run).
fn remove_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NAMESPACE_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').next().unwrap_or("");
        let alive = !pid.is_empty() && std::path::Path::new(&format!("/proc/{pid}")).exists();
        if !alive {
            remove_namespace(name);
            let _ = std::fs::remove_dir_all(
                std::env::temp_dir().join(name.rsplit_once('-').map_or(name, |(p, _)| p)),
            );
        }
    }
}
