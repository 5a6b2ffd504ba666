//! The bench's tables (Markdown), its plot (SVG) and its raw results (JSON).

use std::fmt::Write as _;

use plotters::prelude::*;
use serde_json::json;
use tscf_runtime_smol::core::wire::Transport;

use crate::roles::{Path, PINGS, WINDOW};
use crate::{sim, Options, Results, Run};

/// Where the generated part of BENCHMARKS.md starts and ends.
const BEGIN: &str = "<!-- bench:begin (written by scripts/bench; edit outside these marks) -->";
const END: &str = "<!-- bench:end -->";

/// The machine, and how busy it was around the run.
pub(crate) struct Machine {
    model: String,
    cpus: usize,
    kernel: String,
    memory: String,
    /// What quinn-udp found: datagrams per GSO send, per GRO read.
    offload: (usize, usize),
    load_before: String,
    load_after: String,
    stat_before: (u64, u64),
    /// Share of all CPUs' time that was busy during the run, and how much of it was this
    /// run's processes.
    busy: Option<(f64, f64)>,
    started: std::time::Instant,
}

impl Machine {
    pub(crate) fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
            .unwrap_or_else(|| "unknown".into());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|m| m.split_whitespace().next()?.parse::<f64>().ok())
            .map_or("?".into(), |kib| {
                format!("{:.0} GiB", kib / (1 << 20) as f64)
            });
        Self {
            model,
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: read_trim("/proc/sys/kernel/osrelease"),
            memory,
            offload: offload(),
            load_before: loadavg(),
            load_after: String::new(),
            stat_before: cpu_stat(),
            busy: None,
            started: std::time::Instant::now(),
        }
    }

    /// Notes how busy the machine was since [`read`](Self::read).
    pub(crate) fn finish(&mut self) {
        self.load_after = loadavg();
        let (busy0, total0) = self.stat_before;
        let (busy1, total1) = cpu_stat();
        let ours = children_cpu_seconds();
        let wall = self.started.elapsed().as_secs_f64() * self.cpus as f64;
        if total1 > total0 {
            let share = (busy1 - busy0) as f64 / (total1 - total0) as f64;
            self.busy = Some((share, (ours / wall).min(share)));
        }
    }
}

/// Datagrams per UDP GSO send and per GRO read on a loopback socket (1: not available).
fn offload() -> (usize, usize) {
    let Ok(sock) = std::net::UdpSocket::bind(("127.0.0.1", 0)) else {
        return (1, 1);
    };
    match quinn_udp::UdpSocketState::new((&sock).into()) {
        Ok(state) => (state.max_gso_segments(), state.gro_segments()),
        Err(_) => (1, 1),
    }
}

fn read_trim(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "?".into())
}

fn loadavg() -> String {
    read_trim("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Busy and total jiffies of all CPUs, from `/proc/stat`.
fn cpu_stat() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are fields 4 and 5.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// CPU time of this process and its waited-for children, in seconds.
fn children_cpu_seconds() -> f64 {
    // utime, stime, cutime and cstime are fields 14 to 17.
    crate::stat_seconds("/proc/self/stat", 14..18)
}

/// The `q` quantile of sorted `v` (nearest rank).
pub(crate) fn percentile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Median, minimum and maximum.
fn spread(mut v: Vec<f64>) -> Option<(f64, f64, f64)> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((percentile(&v, 0.5), v[0], v[v.len() - 1]))
}

fn runs(results: &Results, path: Path) -> impl Iterator<Item = &Run> {
    of(results, (path, false))
}

/// The runs of one row: a path, measured with this program or with the `--before` one.
fn of(results: &Results, (path, before): (Path, bool)) -> impl Iterator<Item = &Run> {
    results
        .runs
        .iter()
        .filter(move |r| r.path == path && r.before == before)
}

/// The rows of the tables: every path, and after it the same path measured with the
/// `--before` program, if it was.
fn rows(results: &Results, o: &Options) -> Vec<(Path, bool)> {
    let mut rows = Vec::new();
    for &path in &o.paths {
        rows.push((path, false));
        if of(results, (path, true)).next().is_some() {
            rows.push((path, true));
        }
    }
    rows
}

fn row_name((path, before): (Path, bool)) -> String {
    match before {
        true => format!("{} (before)", path.name()),
        false => path.name(),
    }
}

fn rate(run: &Run, size: usize) -> Option<f64> {
    run.bulk.iter().find(|b| b.0 == size).map(|b| b.1)
}

/// The raw run of the same round as `run`.
fn raw_of<'a>(results: &'a Results, run: &Run) -> Option<&'a Run> {
    runs(results, Path::Raw).find(|r| r.round == run.round)
}

/// Ratios to the raw baseline within each round.
fn ratios(results: &Results, row: (Path, bool), f: impl Fn(&Run) -> Option<f64>) -> Vec<f64> {
    of(results, row)
        .filter_map(|r| Some(f(r)? / f(raw_of(results, r)?)?))
        .collect()
}

fn fmt_spread(s: Option<(f64, f64, f64)>, unit: f64, digits: usize) -> String {
    match s {
        Some((m, lo, hi)) => format!(
            "{:.d$} ({:.d$}–{:.d$})",
            m / unit,
            lo / unit,
            hi / unit,
            d = digits
        ),
        None => "—".into(),
    }
}

/// The Markdown tables of `results`.
pub(crate) fn tables(results: &Results, o: &Options) -> String {
    let mut s = String::new();
    let m = &results.machine;
    let _ = writeln!(s, "### Machine and run\n");
    let _ = writeln!(
        s,
        "- {} CPUs: {}; {} of memory; Linux {}; UDP GSO up to {} datagrams per send, GRO up to {} per read",
        m.cpus, m.model, m.memory, m.kernel, m.offload.0, m.offload.1
    );
    let busy = match m.busy {
        Some((all, ours)) => format!(
            "; during the run {:.0}% of all CPU time was busy, {:.0}% of it this run's processes",
            all * 100.0,
            ours * 100.0
        ),
        None => String::new(),
    };
    let _ = writeln!(
        s,
        "- load average (1, 5, 15 min) {} before and {} after{busy}",
        m.load_before, m.load_after
    );
    let _ = writeln!(
        s,
        "- `{}`: {} rounds, {} datagrams per size and path, at most {WINDOW} in flight; {PINGS} pings per path and round",
        o.command, o.reps, o.count
    );
    let _ = writeln!(
        s,
        "- figures are medians over the rounds with (min–max); ratios are taken within each round against the raw UDP pair of that round"
    );
    if let Some(before) = &o.before {
        let _ = writeln!(
            s,
            "- rows marked (before) are the same measurements made by `{before}`, an earlier build, with a server of its own, in the same rounds and against the same raw pair"
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "### Datagram throughput (packets/s, thousands)\n");
    let mut head = String::from("| path |");
    let mut rule = String::from("|---|");
    for size in &o.sizes {
        let _ = write!(head, " {size} octets | ratio to raw | delivered |");
        rule += "---|---|---|";
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for r in rows(results, o) {
        let mut row = format!("| {} |", row_name(r));
        for &size in &o.sizes {
            let rates = of(results, r).filter_map(|r| rate(r, size)).collect();
            let ratio = ratios(results, r, |r| rate(r, size));
            let (got, sent) = of(results, r)
                .filter_map(|r| r.bulk.iter().find(|b| b.0 == size))
                .fold((0, 0), |(g, t), b| (g + b.2, t + b.3));
            let delivered = match sent {
                0 => "—".into(),
                _ => format!("{:.2}%", got as f64 * 100.0 / sent as f64),
            };
            let _ = write!(
                row,
                " {} | {} | {delivered} |",
                fmt_spread(spread(rates), 1e3, 0),
                fmt_spread(spread(ratio), 1.0, 2)
            );
        }
        let _ = writeln!(s, "{row}");
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "CPU time per datagram, all sizes, of every process on the path (source, sink and, on the relay, the server; user + system, including connecting and the pings), µs:\n"
    );
    let _ = writeln!(
        s,
        "| path | CPU per datagram | ratio to raw |\n|---|---|---|"
    );
    for r in rows(results, o) {
        let cpu = of(results, r).map(|r| r.cpu_us).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} |",
            row_name(r),
            fmt_spread(spread(cpu), 1.0, 2),
            fmt_spread(spread(ratios(results, r, |r| Some(r.cpu_us))), 1.0, 2)
        );
    }
    let _ = writeln!(s);

    let _ = writeln!(s, "### Inner TCP against loopback TCP (Mbit/s)\n");
    if results.inner_tcp.is_empty() {
        let _ = writeln!(s, "*not measured in this run (`--paths-only`, or the `inner_tcp_throughput` example was not built)*\n");
    } else {
        let _ = writeln!(
            s,
            "256 MiB in one connection per round (`inner_tcp_throughput`: a server and two tunnels in one process on one smol thread, UDP server transport), each ratio within its round:\n"
        );
        let _ = writeln!(
            s,
            "| path | Mbit/s | ratio to loopback TCP |\n|---|---|---|"
        );
        let t = &results.inner_tcp;
        for (name, of) in [
            (
                "loopback TCP (kernel)",
                (|t: &crate::InnerTcp| t.loopback) as fn(&crate::InnerTcp) -> f64,
            ),
            ("inner TCP, relay", |t| t.relay),
            ("inner TCP, peer tunnel", |t| t.peer),
        ] {
            let mbps = t.iter().map(of).collect();
            let ratio = t.iter().map(|r| of(r) / r.loopback).collect();
            let _ = writeln!(
                s,
                "| {name} | {} | {} |",
                fmt_spread(spread(mbps), 1.0, 0),
                fmt_spread(spread(ratio), 1.0, 3)
            );
        }
        let _ = writeln!(s);
    }

    let _ = writeln!(s, "### Round trip of a 5-octet ping (µs)\n");
    let _ = writeln!(
        s,
        "| path | p50 | p99 | p50 ratio to raw | p99 ratio to raw |\n|---|---|---|---|---|"
    );
    for r in rows(results, o) {
        let q = |q: f64| move |r: &Run| Some(percentile(&r.rtt_us, q));
        let p50 = of(results, r).filter_map(q(0.5)).collect();
        let p99 = of(results, r).filter_map(q(0.99)).collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} |",
            row_name(r),
            fmt_spread(spread(p50), 1.0, 0),
            fmt_spread(spread(p99), 1.0, 0),
            fmt_spread(spread(ratios(results, r, q(0.5))), 1.0, 2),
            fmt_spread(spread(ratios(results, r, q(0.99))), 1.0, 2),
        );
    }

    let _ = writeln!(s, "\n### Peer tunnel setup (ms)\n");
    let _ = writeln!(s, "| where | setup |\n|---|---|");
    for r in rows(results, o) {
        if let Path::Peer(_) = r.0 {
            let setups = of(results, r).filter_map(|r| r.setup_ms).collect();
            let _ = writeln!(
                s,
                "| loopback, {} | {} |",
                row_name(r),
                fmt_spread(spread(setups), 1.0, 2)
            );
        }
    }
    let _ = writeln!(
        s,
        "| simulator, peer udp, server RTT {} ms, peer RTT {} ms, destination announced ({} seeds) | {} |",
        sim::SERVER_RTT.as_millis(),
        sim::PEER_RTT.as_millis(),
        results.sim_setup_ms.len(),
        fmt_spread(spread(results.sim_setup_ms.clone()), 1.0, 1)
    );

    let _ = writeln!(s, "\n### Server\n");
    let _ = writeln!(s, "| what | figure |\n|---|---|");
    for t in [Transport::UDP, Transport::TLS] {
        let rates = results
            .connects
            .iter()
            .filter(|c| c.0 == t)
            .map(|c| c.1)
            .collect();
        let _ = writeln!(
            s,
            "| tunnels set up per second over {t} (connect, configure, close; 8 at a time from one pinned client process) | {} |",
            fmt_spread(spread(rates), 1.0, 0)
        );
    }
    for (n, per, summary) in &results.idle {
        let figure = per.map_or_else(|| summary.clone(), |p| format!("{p:.1} KiB"));
        let _ = writeln!(
            s,
            "| server memory per idle TLS tunnel, {n} tunnels (`idle_tunnels {n}`: resident set growth) | {figure} |"
        );
    }
    for line in &results.director {
        let _ = writeln!(
            s,
            "| sans-IO director (`cargo bench -p tscf-core --bench director`) | {} |",
            line.replace('|', "/")
        );
    }
    if results.idle.is_empty() && results.director.is_empty() {
        let _ = writeln!(
            s,
            "| memory per idle tunnel | not run (`--idle`, `--director`) |"
        );
    }
    for (n, _, summary) in &results.idle {
        let _ = writeln!(s, "\n`idle_tunnels {n}`: {summary}");
    }
    s
}

/// Replaces the generated part of the Markdown file at `path` (between its marks; appended
/// when it has none) with `tables`.
pub(crate) fn write_markdown(path: &str, tables: &str) -> std::io::Result<()> {
    let old = std::fs::read_to_string(path).unwrap_or_default();
    let block = format!("{BEGIN}\n\n{tables}\n{END}");
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(b), Some(e)) if b < e => format!("{}{block}{}", &old[..b], &old[e + END.len()..]),
        _ => format!("{old}\n{block}\n"),
    };
    std::fs::write(path, new)
}

/// The plot: datagram throughput by path, one panel per size, medians with min–max bars and
/// the raw pair's median as a line. Text is SVG text (no font files are read).
pub(crate) fn plot(path: &str, results: &Results, o: &Options) -> Result<(), String> {
    let root = SVGBackend::new(path, (960, 300 * o.sizes.len() as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((o.sizes.len(), 1));
    let names: Vec<String> = o.paths.iter().map(|p| p.name()).collect();
    for (panel, &size) in panels.iter().zip(&o.sizes) {
        let stats: Vec<Option<(f64, f64, f64)>> = o
            .paths
            .iter()
            .map(|&p| {
                spread(
                    runs(results, p)
                        .filter_map(|r| rate(r, size).map(|x| x / 1e3))
                        .collect(),
                )
            })
            .collect();
        let before: Vec<Option<f64>> = o
            .paths
            .iter()
            .map(|&p| {
                let rates = of(results, (p, true)).filter_map(|r| rate(r, size));
                spread(rates.map(|x| x / 1e3).collect()).map(|s| s.0)
            })
            .collect();
        let outline = match before.iter().any(Option::is_some) {
            true => "; outline: before",
            false => "",
        };
        let top = stats.iter().flatten().map(|s| s.2).fold(1.0, f64::max) * 1.15;
        let n = o.paths.len() as i32;
        let mut chart = ChartBuilder::on(panel)
            .caption(
                format!(
                    "{size}-octet datagrams: thousands of packets/s (median, min–max{outline})"
                ),
                ("sans-serif", 18),
            )
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0.0..top)
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(names.len())
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
                    names.get(*i as usize).cloned().unwrap_or_default()
                }
                SegmentValue::Last => String::new(),
            })
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| e.to_string())?;
        let color = |p: Path| match p {
            Path::Raw => RGBColor(120, 120, 120),
            Path::Peer(_) => RGBColor(31, 119, 180),
            Path::Relay(_) => RGBColor(255, 127, 14),
        };
        chart
            .draw_series(
                o.paths
                    .iter()
                    .zip(&stats)
                    .enumerate()
                    .filter_map(|(i, (&p, s))| {
                        let (median, _, _) = (*s)?;
                        let i = i as i32;
                        let mut bar = Rectangle::new(
                            [
                                (SegmentValue::Exact(i), 0.0),
                                (SegmentValue::Exact(i + 1), median),
                            ],
                            color(p).filled(),
                        );
                        bar.set_margin(0, 0, 12, 12);
                        Some(bar)
                    }),
            )
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(
                o.paths
                    .iter()
                    .zip(&stats)
                    .enumerate()
                    .filter_map(|(i, (_, s))| {
                        let (median, lo, hi) = (*s)?;
                        Some(ErrorBar::new_vertical(
                            SegmentValue::CenterOf(i as i32),
                            lo,
                            median,
                            hi,
                            BLACK.stroke_width(1),
                            8,
                        ))
                    }),
            )
            .map_err(|e| e.to_string())?;
        chart
            .draw_series(before.iter().enumerate().filter_map(|(i, b)| {
                let i = i as i32;
                let corners = [
                    (SegmentValue::Exact(i), 0.0),
                    (SegmentValue::Exact(i + 1), (*b)?),
                ];
                let mut bar = Rectangle::new(corners, BLACK.stroke_width(2));
                bar.set_margin(0, 0, 20, 20);
                Some(bar)
            }))
            .map_err(|e| e.to_string())?;
        if let Some(Some((raw, _, _))) = stats.first() {
            chart
                .draw_series(std::iter::once(PathElement::new(
                    vec![(SegmentValue::Exact(0), *raw), (SegmentValue::Last, *raw)],
                    RGBColor(120, 120, 120).stroke_width(1),
                )))
                .map_err(|e| e.to_string())?;
        }
    }
    root.present().map_err(|e| e.to_string())
}

/// Every measurement, as JSON.
pub(crate) fn json(results: &Results) -> serde_json::Value {
    let runs: Vec<_> = results
        .runs
        .iter()
        .map(|r| {
            json!({
                "round": r.round, "path": r.path.arg(), "before": r.before,
                "setup_ms": r.setup_ms, "cpu_us": r.cpu_us,
                "rtt_p50_us": percentile(&r.rtt_us, 0.5), "rtt_p99_us": percentile(&r.rtt_us, 0.99),
                "bulk": r.bulk.iter().map(|b| json!({"size": b.0, "packets_per_sec": b.1, "received": b.2, "sent": b.3})).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({
        "runs": runs,
        "connects": results.connects.iter().map(|c| json!({"transport": c.0.to_string(), "per_sec": c.1})).collect::<Vec<_>>(),
        "sim_setup_ms": results.sim_setup_ms,
        "idle": results.idle.iter().map(|i| json!({"tunnels": i.0, "kib_per_tunnel": i.1, "summary": i.2})).collect::<Vec<_>>(),
        "director": results.director,
        "inner_tcp_mbps": results.inner_tcp.iter().map(|t| json!({"loopback": t.loopback, "relay": t.relay, "peer": t.peer})).collect::<Vec<_>>(),
    })
}
