//! tscf against raw baselines, in one run: datagram throughput, round trips and setup times
//! of the peer and relay paths next to a plain UDP socket pair, server memory per idle tunnel
//! and tunnel set-ups per second.
//!
//! ```sh
//! scripts/bench                       # everything; rewrites BENCHMARKS.md's tables and docs/bench.svg
//! cargo run --release -p tscf-runtime-smol --example bench            # paths only, printed
//! cargo run --release -p tscf-runtime-smol --example bench -- --reps 3 --count 5000 --paths raw,peer-udp,relay-udp
//! ```
//!
//! Every measurement runs in processes of this program: one server (all five transports on
//! loopback, not pinned), and for each measured path a sink pinned to CPU 1 and a source
//! pinned to CPU 0 (`sched_setaffinity` before any thread starts, so every thread of the
//! process, the runtime's included, stays there). The raw baseline is the same pair of
//! processes on a plain UDP socket pair. Paths are measured in turns, raw first, and the
//! whole round is repeated (`--reps`, default 5), so a disturbance hits every path alike; each
//! figure is the median with the minimum and maximum over the rounds, and each ratio is taken
//! within a round.
//!
//! Throughput follows `tscf demo`: the source sends `--count` datagrams (default 20,000) of
//! 100 and of 1,200 octets, at most 64 in flight; the sink hands back a credit for each one
//! it receives (over a loopback socket of its own; credits for datagrams that arrived
//! together travel in one message); with no credit for 100 ms the datagrams in flight count
//! as lost. The rate is credited datagrams over the time from the first send to the last
//! credit. Round trips are 500 pings of 5 octets echoed by the sink. The peer tunnel's setup
//! time is what the source's tunnel reports when it comes up. With `--idle N,…` it also runs
//! the `idle_tunnels` example (built beside this one) for each count, and `--director FILE`
//! reads the output of `cargo bench -p tscf-core --bench director`. Unless `--paths-only`, each
//! round also runs the `inner_tcp_throughput` example (built beside this one): 256 MiB over
//! kernel TCP on loopback, then over inner TCP through the relay and through a peer tunnel,
//! each ratio taken against the loopback transfer of its round. Linux only.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod report;
mod roles;
mod sim;

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use roles::{Path, ServerInfo};
use tscf_runtime_smol::core::wire::Transport;

/// The CPUs of the source and the sink.
const SOURCE_CPU: usize = 0;
const SINK_CPU: usize = 1;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "server" => roles::server(),
        "sink" => {
            pin_if(arg(1));
            let path = Path::parse(arg(2)).expect("a path");
            let server = (path != Path::Raw).then(|| ServerInfo::from_args(arg(3), arg(4)));
            roles::sink(path, server);
        }
        "source" => {
            pin_if(arg(1));
            let path = Path::parse(arg(2)).expect("a path");
            let server = (path != Path::Raw).then(|| ServerInfo::from_args(arg(3), arg(4)));
            let to: SocketAddr = arg(5).parse().expect("the sink's address");
            let count = arg(6).parse().expect("a count");
            let sizes: Vec<usize> = arg(7)
                .split(',')
                .map(|s| s.parse().expect("a size"))
                .collect();
            roles::source(path, server, to, sizes, count);
        }
        "connects" => {
            pin_if(arg(1));
            let t = roles::transport(arg(2)).expect("a transport");
            let server = ServerInfo::from_args(arg(3), arg(4));
            roles::connects(server, t, arg(5).parse().expect("seconds"));
        }
        _ => orchestrate(&args),
    }
}

/// Pins this process to the CPU `cpu` names, if it names one.
fn pin_if(cpu: &str) {
    if let Ok(cpu) = cpu.parse() {
        roles::pin(cpu);
    }
}

/// What the run was asked for.
pub(crate) struct Options {
    pub(crate) reps: usize,
    pub(crate) count: u32,
    pub(crate) sizes: Vec<usize>,
    pub(crate) paths: Vec<Path>,
    pub(crate) idle: Vec<usize>,
    pub(crate) director: Option<String>,
    pub(crate) write: Option<String>,
    pub(crate) svg: Option<String>,
    pub(crate) json: Option<String>,
    /// Only the paths: no tunnel set-up rates, no simulator.
    pub(crate) paths_only: bool,
    /// Another build of this program (an earlier version of tscf): its paths are measured in
    /// the same rounds, against the same raw pair, with a server of its own.
    pub(crate) before: Option<String>,
    pub(crate) command: String,
}

fn options(args: &[String]) -> Options {
    let mut o = Options {
        reps: 5,
        count: 20_000,
        sizes: vec![100, 1200],
        paths: vec![
            Path::Raw,
            Path::Peer(Transport::UDP),
            Path::Peer(Transport::DTLS),
            Path::Peer(Transport::QUIC),
            Path::Relay(Transport::UDP),
            Path::Relay(Transport::TCP),
            Path::Relay(Transport::TLS),
            Path::Relay(Transport::DTLS),
            Path::Relay(Transport::QUIC),
        ],
        idle: Vec::new(),
        director: None,
        write: None,
        svg: None,
        json: None,
        paths_only: false,
        before: None,
        command: std::iter::once("bench".to_owned())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || it.next().cloned().unwrap_or_else(|| usage(a));
        match a.as_str() {
            "--reps" => o.reps = value().parse().unwrap_or_else(|_| usage(a)),
            "--count" => o.count = value().parse().unwrap_or_else(|_| usage(a)),
            "--sizes" => {
                o.sizes = value()
                    .split(',')
                    .map(|n| n.parse().ok().filter(|n| (7..=1372).contains(n)))
                    .map(|n| n.unwrap_or_else(|| usage(a)))
                    .collect()
            }
            "--paths" => {
                o.paths = value()
                    .split(',')
                    .map(|p| Path::parse(p).unwrap_or_else(|| usage(a)))
                    .collect();
                if !o.paths.contains(&Path::Raw) {
                    o.paths.insert(0, Path::Raw);
                }
            }
            "--idle" => {
                o.idle = value()
                    .split(',')
                    .map(|n| n.parse().unwrap_or_else(|_| usage(a)))
                    .collect()
            }
            "--director" => o.director = Some(value()),
            "--write" => o.write = Some(value()),
            "--svg" => o.svg = Some(value()),
            "--json" => o.json = Some(value()),
            "--paths-only" => o.paths_only = true,
            "--before" => o.before = Some(value()),
            _ => usage(a),
        }
    }
    o
}

fn usage(at: &str) -> ! {
    eprintln!(
        "bench: bad argument at {at}\nusage: bench [--reps N] [--count N] [--sizes 100,1200] \
         [--paths raw,peer-udp,…] \
         [--paths-only] [--before EXE] [--idle N,…] [--director FILE] [--write BENCHMARKS.md] [--svg FILE] \
         [--json FILE]"
    );
    std::process::exit(2);
}

/// What one source measured on one path.
#[derive(Clone, Debug)]
pub(crate) struct Run {
    pub(crate) round: usize,
    pub(crate) path: Path,
    /// Measured with the `--before` program.
    pub(crate) before: bool,
    pub(crate) setup_ms: Option<f64>,
    /// CPU time of the source, the sink and the server over the source's run, per datagram
    /// it sent in bulk, in microseconds.
    pub(crate) cpu_us: f64,
    /// Sorted round trips, microseconds.
    pub(crate) rtt_us: Vec<f64>,
    /// Per size: packets/s, received, sent.
    pub(crate) bulk: Vec<(usize, f64, u64, u64)>,
}

/// Everything one run of the bench measured.
pub(crate) struct Results {
    pub(crate) machine: report::Machine,
    pub(crate) runs: Vec<Run>,
    /// Tunnels set up (connected, configured, closed) per second, per transport and round.
    pub(crate) connects: Vec<(Transport, f64)>,
    pub(crate) sim_setup_ms: Vec<f64>,
    /// Tunnels, KiB per tunnel, and the example's summary.
    pub(crate) idle: Vec<(usize, Option<f64>, String)>,
    /// The director bench's lines, as printed.
    pub(crate) director: Vec<String>,
    /// Per round, Mbit/s of one bulk transfer: loopback TCP, inner TCP over the relay and
    /// over a peer tunnel (`inner_tcp_throughput`).
    pub(crate) inner_tcp: Vec<InnerTcp>,
}

/// One round of `inner_tcp_throughput`, in Mbit/s.
#[derive(Clone, Copy, Debug)]
pub(crate) struct InnerTcp {
    pub(crate) loopback: f64,
    pub(crate) relay: f64,
    pub(crate) peer: f64,
}

fn orchestrate(args: &[String]) {
    let o = options(args);
    let machine = report::Machine::read();
    let exe = std::env::current_exe().expect("this program");
    let (mut server, info) = start_server(&exe);
    let mut before = o.before.as_ref().map(|b| {
        let exe = std::path::PathBuf::from(b);
        let (server, info) = start_server(&exe);
        (exe, server, info)
    });
    eprintln!("server up; {} rounds of {} paths", o.reps, o.paths.len());
    let mut runs = Vec::new();
    let mut connects = Vec::new();
    let mut inner_tcp_rounds = Vec::new();
    let sizes = o
        .sizes
        .iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for round in 0..o.reps {
        for &path in &o.paths {
            let run = measure(&exe, &info, server.id(), path, &sizes, o.count, round);
            eprintln!("round {round} {:<11} {}", path.name(), summary(&run));
            runs.push(run);
            if let (Some((exe, server, info)), false) = (&before, path == Path::Raw) {
                let mut run = measure(exe, info, server.id(), path, &sizes, o.count, round);
                run.before = true;
                eprintln!(
                    "round {round} {:<11} {} (before)",
                    path.name(),
                    summary(&run)
                );
                runs.push(run);
            }
        }
        let rates = if o.paths_only {
            &[][..]
        } else {
            &[Transport::UDP, Transport::TLS][..]
        };
        for &t in rates {
            let per_sec = connect_rate(&exe, &info, t);
            eprintln!("round {round} connects over {t}: {per_sec:.0}/s");
            connects.push((t, per_sec));
        }
        if !o.paths_only {
            if let Some(t) = inner_tcp(&exe) {
                eprintln!(
                    "round {round} inner TCP: loopback {:.0}, relay {:.0}, peer {:.0} Mbit/s",
                    t.loopback, t.relay, t.peer
                );
                inner_tcp_rounds.push(t);
            }
        }
    }
    for server in std::iter::once(&mut server).chain(before.as_mut().map(|b| &mut b.1)) {
        drop(server.stdin.take());
        let _ = server.wait();
    }
    let seeds = if o.paths_only {
        0
    } else {
        o.reps.max(5) as u64
    };
    let sim_setup_ms = (1..=seeds)
        .map(|seed| sim::setup_time(seed).as_secs_f64() * 1e3)
        .collect();
    let idle = o.idle.iter().map(|&n| idle_tunnels(&exe, n)).collect();
    let director = o
        .director
        .as_ref()
        .map(|f| {
            std::fs::read_to_string(f)
                .expect("the director bench's output")
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let mut results = Results {
        machine,
        runs,
        connects,
        sim_setup_ms,
        idle,
        director,
        inner_tcp: inner_tcp_rounds,
    };
    results.machine.finish();
    let tables = report::tables(&results, &o);
    println!("{tables}");
    if let Some(path) = &o.write {
        report::write_markdown(path, &tables).expect("BENCHMARKS.md written");
    }
    if let Some(path) = &o.svg {
        report::plot(path, &results, &o).expect("plot written");
    }
    if let Some(path) = &o.json {
        std::fs::write(path, report::json(&results).to_string()).expect("JSON written");
    }
}

fn summary(run: &Run) -> String {
    let mut s = String::new();
    for (size, rate, received, sent) in &run.bulk {
        s += &format!("{size}: {rate:.0}/s ({received}/{sent})  ");
    }
    let p50 = report::percentile(&run.rtt_us, 0.5);
    s += &format!("rtt p50 {p50:.0} us");
    if let Some(setup) = run.setup_ms {
        s += &format!("  setup {setup:.2} ms");
    }
    s
}

/// Starts the server process of program `exe`: the process, and its addresses.
fn start_server(exe: &std::path::Path) -> (Child, ServerInfo) {
    let mut server = Command::new(exe)
        .arg("server")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("server process");
    let line = read_line(&mut server);
    let v: serde_json::Value = serde_json::from_str(&line).expect("server info");
    let info = ServerInfo {
        addrs: v["addrs"].clone(),
        fingerprint: v["fingerprint"].as_str().expect("fingerprint").to_owned(),
    };
    (server, info)
}

/// One sink and one source on `path`; what the source measured.
#[allow(clippy::too_many_arguments)]
fn measure(
    exe: &std::path::Path,
    info: &ServerInfo,
    server: u32,
    path: Path,
    sizes: &str,
    count: u32,
    round: usize,
) -> Run {
    let [addrs, fingerprint] = info.args();
    let mut sink = Command::new(exe)
        .args([
            "sink",
            &SINK_CPU.to_string(),
            &path.arg(),
            &addrs,
            &fingerprint,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sink process");
    let ready = read_line(&mut sink);
    let to = roles::ready_addr(&ready).unwrap_or_else(|| panic!("sink: {ready:?}"));
    let before = cpu_seconds(sink.id()) + cpu_seconds(server);
    let out = Command::new(exe)
        .args([
            "source",
            &SOURCE_CPU.to_string(),
            &path.arg(),
            &addrs,
            &fingerprint,
        ])
        .args([to.to_string(), count.to_string(), sizes.to_owned()])
        .stderr(Stdio::inherit())
        .output()
        .expect("source process");
    let others = cpu_seconds(sink.id()) + cpu_seconds(server) - before;
    // Closing its input ends the sink: it releases its tunnel and exits (and under valgrind
    // writes its profile).
    drop(sink.stdin.take());
    let _ = sink.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("source on {}: {e}: {text:?}", path.name()));
    let bulk = v["bulk"]
        .as_object()
        .expect("bulk results")
        .iter()
        .map(|(size, r)| {
            (
                size.parse().expect("a size"),
                r["packets_per_sec"].as_f64().unwrap_or(0.0),
                r["received"].as_u64().unwrap_or(0),
                r["sent"].as_u64().unwrap_or(0),
            )
        })
        .collect::<Vec<_>>();
    let mut bulk = bulk;
    bulk.sort_by_key(|b| b.0);
    let datagrams: u64 = bulk.iter().map(|b| b.2).sum();
    Run {
        round,
        path,
        before: false,
        cpu_us: (others + v["cpu_s"].as_f64().unwrap_or(0.0)) * 1e6 / datagrams.max(1) as f64,
        setup_ms: v["setup_ms"].as_f64(),
        rtt_us: v["rtt_us"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_f64).collect())
            .unwrap_or_default(),
        bulk,
    }
}

/// Tunnel set-ups per second over `t`, from a client process pinned to the source's CPU.
fn connect_rate(exe: &std::path::Path, info: &ServerInfo, t: Transport) -> f64 {
    let [addrs, fingerprint] = info.args();
    let out = Command::new(exe)
        .args(["connects", &SOURCE_CPU.to_string()])
        .args([t.to_string().to_lowercase(), addrs, fingerprint, "2".into()])
        .stderr(Stdio::inherit())
        .output()
        .expect("connects process");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(text.trim()).expect("a rate");
    v["per_sec"].as_f64().unwrap_or(0.0)
}

/// Runs the `idle_tunnels` example with `n` tunnels: KiB per tunnel, and its summary.
/// Runs the `inner_tcp_throughput` example (built beside this one) once: 256 MiB over loopback
/// TCP, then over inner TCP through the relay and through a peer tunnel; `None`, said on
/// stderr, when it cannot run or prints no figures.
fn inner_tcp(exe: &std::path::Path) -> Option<InnerTcp> {
    let program = exe.with_file_name("inner_tcp_throughput");
    let out = Command::new(&program)
        .args(["--mb", "256"])
        .stderr(Stdio::inherit())
        .output();
    let text = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => {
            eprintln!("inner TCP not measured: {} ({e})", program.display());
            return None;
        }
    };
    // Each row: the label in 22 columns, then seconds and Mbit/s.
    let mbps = |label: &str| -> Option<f64> {
        let line = text.lines().find(|l| l.starts_with(label))?;
        line.get(22..)?.split_whitespace().nth(1)?.parse().ok()
    };
    let measured = (|| {
        Some(InnerTcp {
            loopback: mbps("loopback TCP")?,
            relay: mbps("inner TCP, relay")?,
            peer: mbps("inner TCP, peer")?,
        })
    })();
    if measured.is_none() {
        eprintln!(
            "inner TCP not measured: {} printed {text:?}",
            program.display()
        );
    }
    measured
}

fn idle_tunnels(exe: &std::path::Path, n: usize) -> (usize, Option<f64>, String) {
    let idle = exe.with_file_name("idle_tunnels");
    eprintln!("{n} idle TLS tunnels ...");
    let out = Command::new(&idle)
        .arg(n.to_string())
        .stderr(Stdio::inherit())
        .output();
    let text = match out {
        Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
        Err(e) => format!("not run: {} ({e})", idle.display()),
    };
    let per = text.lines().find_map(|l| {
        let (_, rest) = l.split_once(" KiB, ")?;
        rest.split_whitespace().next()?.parse().ok()
    });
    let summary = text
        .lines()
        .filter(|l| !l.starts_with("  clients"))
        .collect::<Vec<_>>()
        .join("; ");
    (n, per, summary)
}

/// User plus system CPU time of process `pid` and its threads so far, in seconds (10 ms
/// resolution); 0 once it is gone.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    // utime and stime are fields 14 and 15 of `/proc/PID/stat`.
    stat_seconds(&format!("/proc/{pid}/stat"), 14..16)
}

/// The sum of `fields` (numbered from 1, as in proc(5)) of a `/proc/PID/stat` file, in
/// seconds: they count `USER_HZ` ticks, 100 a second.
pub(crate) fn stat_seconds(path: &str, fields: std::ops::Range<usize>) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // The command name (field 2) may hold spaces; field 3 follows its closing parenthesis.
    let rest = stat.rfind(')').map_or("", |i| &stat[i + 2..]);
    let ticks: u64 = rest
        .split_whitespace()
        .skip(fields.start - 3)
        .take(fields.len())
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    ticks as f64 / 100.0
}

fn read_line(child: &mut Child) -> String {
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped"))
        .read_line(&mut line)
        .expect("a line");
    let _ = std::io::stderr().flush();
    line
}
