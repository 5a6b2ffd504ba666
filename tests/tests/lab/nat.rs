//! NATs over time: a client whose NAT gives it a new public port (rebinding) while active and
//! while idle, on the relay and on a peer tunnel; an idle receiver behind a NAT with a short UDP
//! timeout, reached by the relay when its peer path is cut; a client that only sends; a stream
//! of 1,400-octet datagrams (GStreamer's RTP payloaders' default) through `--forward`. Each
//! prints what it measured: how long the media stopped and how many datagrams were lost.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use tscf_tests::lab::{Lab, Media, Nat, Proc, SERVER_IP};

use super::{args, lab, start_server, FIRST, MEDIA_INTERVAL, MEDIA_PORT, SECOND, SILENCE};

/// Events that mean the client lost its transport or its tunnel: none may appear while a NAT
/// rebinds or a client only sends.
const LOSSES: &[&str] = &[
    "transport_lost",
    "tunnel_closed",
    "new_tunnel",
    "reattached",
];

/// A `tscf client --json` in `ns` with `extra` arguments; returns once it is connected, with
/// the local address of its first forward, if it has one.
fn client(
    lab: &mut Lab,
    tscf: &Path,
    ns: &str,
    server: SocketAddr,
    extra: &[&str],
) -> (Proc, Option<SocketAddr>) {
    let server = server.to_string();
    let mut list = args(&[
        "client",
        "--server",
        &server,
        "--token",
        tscf_tests::lab::TOKEN,
        "--json",
    ]);
    list.extend(args(extra));
    let mut proc = lab.spawn(ns, tscf, &list);
    if proc
        .wait_for("connected", Duration::from_secs(15))
        .is_none()
    {
        panic!("the client in {ns} did not connect\n{}", proc.transcript());
    }
    let local = extra.contains(&"--forward").then(|| {
        let Some(line) = proc.wait_for("forward", Duration::from_secs(5)) else {
            panic!("no forward in {ns}\n{}", proc.transcript());
        };
        line.json().unwrap()["local"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    });
    (proc, local)
}

/// Asserts that none of `procs` reported losing its transport or tunnel.
fn assert_no_loss(procs: &mut [&mut Proc], what: &str) {
    for p in procs.iter_mut() {
        p.drain();
        let names = p.names();
        let lost: Vec<&String> = names
            .iter()
            .filter(|n| LOSSES.contains(&n.as_str()))
            .collect();
        assert!(lost.is_empty(), "{what}: {lost:?}\n{}", p.transcript());
    }
}

/// Datagrams `from` sent that `to` did not receive, between two snapshots taken when the
/// stream was steady (in flight at each end cancel out).
fn lost(before: (u64, usize), after: (u64, usize)) -> i64 {
    let sent = after.0 as i64 - before.0 as i64;
    let received = after.1 as i64 - before.1 as i64;
    sent - received
}

fn snapshot(from: &Media, to: &Media) -> (u64, usize) {
    (from.stats().sent, to.stats().received)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Waits until the stream from `from` to `to` is steady again after `t` (a second of media
/// arrived), then a second more; the datagrams lost since `before`.
fn settle(from: &Media, to: &Media, t: Instant, before: (u64, usize)) -> Option<i64> {
    let per_second = (Duration::from_secs(1).as_millis() / MEDIA_INTERVAL.as_millis()) as usize;
    to.wait_received_after(t, per_second, Duration::from_secs(30))?;
    let now = Instant::now();
    to.wait_received_after(now, per_second, Duration::from_secs(5))?;
    Some(lost(before, snapshot(from, to)))
}

/// A call between A and B (media both ways every 20 ms, `--forward`), and B's NAT rebinding:
/// on the relay (B's mapping towards the server) and on a peer tunnel (all of B's mappings),
/// with B active, and with both idle at the rebinding (then A's media resumes; on the peer
/// tunnel only A's, so that B is an idle receiver).
#[test]
fn a_rebinding_nat_costs_the_media_under_a_second_on_the_relay_and_the_peer_silence_on_a_peer_tunnel(
) {
    let Some((mut lab, tscf)) = lab() else { return };
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (site_a.hosts[0].0.clone(), site_b.hosts[0].0.clone());
    for peer in [false, true] {
        let path = if peer { "peer tunnel" } else { "relay" };
        let (server, addr) = start_server(&mut lab, &tscf);
        let to_b = format!("127.0.0.1:0={SECOND}:{MEDIA_PORT}");
        let to_a = format!("127.0.0.1:0={FIRST}:{MEDIA_PORT}");
        let peer_args: &[&str] = if peer { &["--peer"] } else { &[] };
        let (mut a, local_a) = client(
            &mut lab,
            &tscf,
            &a_ns,
            addr,
            &[&["--forward", &to_b][..], peer_args].concat(),
        );
        let (mut b, local_b) = client(
            &mut lab,
            &tscf,
            &b_ns,
            addr,
            &[&["--forward", &to_a][..], peer_args].concat(),
        );
        let media_a = Media::start(&a_ns, local_a.unwrap(), MEDIA_INTERVAL).unwrap();
        let media_b = Media::start(&b_ns, local_b.unwrap(), MEDIA_INTERVAL).unwrap();
        let transcript = |a: &Proc, b: &Proc| format!("{}{}", a.transcript(), b.transcript());
        if peer
            && a.wait_for("peer_tunnel_up", Duration::from_secs(15))
                .is_none()
        {
            panic!("no peer tunnel\n{}", transcript(&a, &b));
        }
        let steady = Instant::now();
        assert!(media_b
            .wait_received_after(steady, 10, Duration::from_secs(10))
            .is_some());
        assert!(media_a
            .wait_received_after(steady, 10, Duration::from_secs(10))
            .is_some());

        // Active: B's NAT rebinds mid-call.
        let towards = (!peer).then_some(SERVER_IP);
        let (ab, ba) = (snapshot(&media_a, &media_b), snapshot(&media_b, &media_a));
        let t = Instant::now();
        lab.rebind(&site_b, towards);
        let lost_ab = settle(&media_a, &media_b, t, ab);
        let lost_ba = settle(&media_b, &media_a, t, ba);
        let (Some(lost_ab), Some(lost_ba)) = (lost_ab, lost_ba) else {
            panic!(
                "{path}: the media did not come back\n{}",
                transcript(&a, &b)
            );
        };
        let gap_b = media_b.longest_gap_after(t);
        let gap_a = media_a.longest_gap_after(t);
        println!(
            "{path}, B active: NAT rebinding; media silent {:.0} ms at B ({lost_ab} lost), \
             {:.0} ms at A ({lost_ba} lost)",
            ms(gap_b),
            ms(gap_a)
        );
        // On the relay the media resumes within 1 s of B's next packet (20 ms later): 2 s with
        // scheduling noise. On a peer tunnel, after its silence timeout, over the relay.
        let bound = if peer {
            SILENCE + Duration::from_millis(1500)
        } else {
            Duration::from_secs(2)
        };
        assert!(
            gap_a < bound && gap_b < bound,
            "{path}: {gap_a:?}/{gap_b:?}\n{}",
            transcript(&a, &b)
        );
        assert_no_loss(&mut [&mut a, &mut b], path);
        if peer {
            // Read already, or still to come.
            let seen = a
                .seen()
                .iter()
                .find(|e| e.at > t && e.name().as_deref() == Some("peer_tunnel_up"))
                .cloned();
            let up = seen.or_else(|| a.wait_for("peer_tunnel_up", Duration::from_secs(30)));
            let Some(up) = up else {
                panic!("no new peer tunnel\n{}", transcript(&a, &b));
            };
            println!(
                "{path}: a new peer tunnel {:.0} ms after the rebinding",
                ms(up.at - t)
            );
        }

        // Idle: both stop, B's NAT rebinds, then the media comes back (only A's on the peer
        // tunnel: B receives and sends nothing).
        media_a.pause();
        media_b.pause();
        // Nothing in flight any more: 200 ms without an arrival at either end.
        loop {
            let mark = Instant::now();
            let b_got = media_b
                .wait_received_after(mark, 1, Duration::from_millis(200))
                .is_some();
            if !b_got && media_a.received_after(mark) == 0 {
                break;
            }
        }
        lab.rebind(&site_b, towards);
        if peer {
            // The peer tunnel goes down: B's peer mapping is gone.
            if b.wait_for("peer_tunnel_down", Duration::from_secs(10))
                .is_none()
            {
                panic!("the peer tunnel stayed up\n{}", transcript(&a, &b));
            }
        }
        let ab = snapshot(&media_a, &media_b);
        let t = Instant::now();
        media_a.resume();
        if !peer {
            media_b.resume();
        }
        let Some(first) = media_b.wait_received_after(t, 1, Duration::from_secs(30)) else {
            panic!("{path}: nothing reached the idle B\n{}", transcript(&a, &b));
        };
        let lost_ab = settle(&media_a, &media_b, t, ab).unwrap_or(-1);
        println!(
            "{path}, both idle at the rebinding: A's media reached B {:.0} ms after it resumed \
             ({lost_ab} lost)",
            ms(first - t)
        );
        assert!(
            first - t < Duration::from_secs(2),
            "{path}\n{}",
            transcript(&a, &b)
        );
        assert_no_loss(&mut [&mut a, &mut b], path);
        drop((media_a, media_b));
        lab.terminate(&a);
        lab.terminate(&b);
        lab.terminate(&server);
    }
}

/// B only receives (`--listen`, a receiver that never sends), behind a NAT that forgets an
/// idle UDP mapping after 5 s (then 20 s): while the peer tunnel carries A's media, B's mapping
/// towards the server expires. When the peer path is cut, the relay must reach B within 2 s.
#[test]
fn an_idle_receiver_behind_a_short_nat_timeout_is_reached_by_the_relay_within_2_s_of_a_cut() {
    let Some((mut lab, tscf)) = lab() else { return };
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (site_a.hosts[0].0.clone(), site_b.hosts[0].0.clone());
    for timeout in [5u32, 20] {
        lab.udp_timeout(&site_b, timeout);
        let (server, addr) = start_server(&mut lab, &tscf);
        let (receiver, receiver_addr) = Media::listen(&b_ns, 160).unwrap();
        let listen = format!("udp:{MEDIA_PORT}={receiver_addr}");
        let to_b = format!("127.0.0.1:0={SECOND}:{MEDIA_PORT}");
        let (mut a, local_a) = client(
            &mut lab,
            &tscf,
            &a_ns,
            addr,
            &["--peer", "--forward", &to_b],
        );
        let (mut b, _) = client(
            &mut lab,
            &tscf,
            &b_ns,
            addr,
            &["--peer", "--listen", &listen],
        );
        let media = Media::start(&a_ns, local_a.unwrap(), MEDIA_INTERVAL).unwrap();
        let transcript = |a: &Proc, b: &Proc| format!("{}{}", a.transcript(), b.transcript());
        let Some(up) = a.wait_for("peer_tunnel_up", Duration::from_secs(15)) else {
            panic!("no peer tunnel\n{}", transcript(&a, &b));
        };
        assert!(receiver
            .wait_received_after(up.at, 10, Duration::from_secs(10))
            .is_some());
        // Wait for B's mapping towards the server to expire at its NAT (it may not, with a
        // timeout as long as B's keepalive interval).
        let waiting = Instant::now();
        let expired = loop {
            let out = lab.run(
                &site_b.router,
                &["conntrack", "-L", "-p", "udp", "-d", &SERVER_IP.to_string()],
            );
            if !String::from_utf8_lossy(&out.stdout).contains("dport=4440") {
                break true;
            }
            if waiting.elapsed() > Duration::from_secs(u64::from(timeout) + 25) {
                break false;
            }
            // Polling conntrack, twice a second.
            std::thread::sleep(Duration::from_millis(500));
        };
        // The peer tunnel's own keepalives kept its mapping all along.
        for p in [&mut a, &mut b] {
            p.drain();
            let names = p.names();
            assert!(
                !names.iter().any(|n| n == "peer_tunnel_down"),
                "{timeout} s NAT: {names:?}\n{}",
                p.transcript()
            );
        }
        let before = snapshot(&media, &receiver);
        let cut = Instant::now();
        lab.cut(&site_a, site_b.public_ip);
        let Some(lost) = settle(&media, &receiver, cut, before) else {
            panic!(
                "{timeout} s NAT: the relay never reached B\n{}",
                transcript(&a, &b)
            );
        };
        let gap = receiver.longest_gap_after(cut);
        b.drain();
        println!(
            "NAT UDP timeout {timeout} s, B's server mapping {}: peer path cut; the relay reached \
             the idle B after {:.0} ms ({lost} lost)",
            if expired { "expired" } else { "still there" },
            ms(gap)
        );
        // 2 s, and 0.5 s for scheduling noise.
        assert!(
            gap < Duration::from_millis(2500),
            "{timeout} s: {gap:?}\n{}",
            transcript(&a, &b)
        );
        lab.heal(&site_a);
        drop((media, receiver));
        lab.terminate(&a);
        lab.terminate(&b);
        lab.terminate(&server);
    }
}

/// A sends to B over the relay and hears nothing back but the server; B only receives. Neither
/// may lose its transport. Five minutes at the default 20 s keepalive are five silence windows
/// of 60 s; with `--keepalive 5` the same five windows (15 s each) take 75 s, which is what
/// this runs. `TSCF_LAB_LONG=1` runs the five minutes at the default keepalive instead.
#[test]
fn a_client_that_only_sends_keeps_its_transport() {
    let Some((mut lab, tscf)) = lab() else { return };
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (site_a.hosts[0].0.clone(), site_b.hosts[0].0.clone());
    let (server, addr) = start_server(&mut lab, &tscf);
    let (receiver, receiver_addr) = Media::listen(&b_ns, 160).unwrap();
    let listen = format!("udp:{MEDIA_PORT}={receiver_addr}");
    let to_b = format!("127.0.0.1:0={SECOND}:{MEDIA_PORT}");
    let long = std::env::var_os("TSCF_LAB_LONG").is_some_and(|v| v == "1");
    let (keepalive, run): (&[&str], _) = match long {
        true => (&[], Duration::from_secs(300)),
        false => (&["--keepalive", "5"], Duration::from_secs(75)),
    };
    let (mut a, local_a) = client(
        &mut lab,
        &tscf,
        &a_ns,
        addr,
        &[keepalive, &["--forward", &to_b]].concat(),
    );
    let (mut b, _) = client(
        &mut lab,
        &tscf,
        &b_ns,
        addr,
        &[keepalive, &["--listen", &listen]].concat(),
    );
    let media = Media::start(&a_ns, local_a.unwrap(), MEDIA_INTERVAL).unwrap();
    let start = Instant::now();
    // Watch A's events for the whole run.
    while let Some(e) = a.next(run.saturating_sub(start.elapsed())) {
        if let Some(name) = e.name() {
            assert!(
                !LOSSES.contains(&name.as_str()),
                "{name}\n{}",
                a.transcript()
            );
        }
    }
    assert_no_loss(&mut [&mut a, &mut b], "send-only");
    let stats = (media.stats().sent, receiver.stats().received);
    println!(
        "send-only for {:.0} s (keepalive {}): no transport loss; {} sent, {} received",
        start.elapsed().as_secs_f64(),
        keepalive
            .get(1)
            .map_or("20 s, the default".to_owned(), |k| format!("{k} s")),
        stats.0,
        stats.1
    );
    drop((media, receiver));
    lab.terminate(&a);
    lab.terminate(&b);
    lab.terminate(&server);
}

/// An RTP-like stream of 1,400-octet datagrams every 20 ms for 5 s through `--forward`, on
/// the relay and then with peer tunneling: larger than the tunnel's 1,400-octet inner packets,
/// each crosses in two IPv4 fragments; nothing is refused at the forward.
#[test]
fn an_rtp_stream_of_1400_octet_datagrams_crosses_a_forward() {
    let Some((mut lab, tscf)) = lab() else { return };
    let site_a = lab.add_site(Nat::PortRestricted, 1);
    let site_b = lab.add_site(Nat::PortRestricted, 1);
    let (a_ns, b_ns) = (site_a.hosts[0].0.clone(), site_b.hosts[0].0.clone());
    for peer in [false, true] {
        let path = if peer { "peer tunnel" } else { "relay" };
        let (server, addr) = start_server(&mut lab, &tscf);
        let (receiver, receiver_addr) = Media::listen(&b_ns, 1400).unwrap();
        let listen = format!("udp:{MEDIA_PORT}={receiver_addr}");
        let to_b = format!("127.0.0.1:0={SECOND}:{MEDIA_PORT}");
        let peer_args: &[&str] = if peer { &["--peer"] } else { &[] };
        let (mut a, local_a) = client(
            &mut lab,
            &tscf,
            &a_ns,
            addr,
            &[&["--forward", &to_b][..], peer_args].concat(),
        );
        let (b, _) = client(
            &mut lab,
            &tscf,
            &b_ns,
            addr,
            &[&["--listen", &listen][..], peer_args].concat(),
        );
        if peer {
            // Up first, so that the stream runs on it.
            let probe = Media::start_sized(&a_ns, local_a.unwrap(), MEDIA_INTERVAL, 100).unwrap();
            if a.wait_for("peer_tunnel_up", Duration::from_secs(15))
                .is_none()
            {
                panic!("no peer tunnel\n{}{}", a.transcript(), b.transcript());
            }
            drop(probe);
        }
        let start = Instant::now();
        let media = Media::start_sized(&a_ns, local_a.unwrap(), MEDIA_INTERVAL, 1400).unwrap();
        let _ = receiver.wait_received_after(start, 250, Duration::from_secs(5));
        media.pause();
        let sent = media.stats().sent;
        // Whatever is still on its way arrives within a few intervals.
        let _ = receiver.wait_received_after(start, sent as usize, Duration::from_secs(2));
        let received = receiver.stats().received;
        assert_eq!(lab.terminate(&a), Some(0), "{}", a.transcript());
        let drops: Vec<String> = a
            .seen()
            .iter()
            .filter(|e| e.name().as_deref() == Some("forward_dropped"))
            .map(|e| e.line.clone())
            .collect();
        println!(
            "{path}: {sent} datagrams of 1,400 octets, {received} received, {} lost; forward \
             drops: {drops:?}",
            sent as i64 - received as i64
        );
        assert!(drops.is_empty(), "{drops:?}");
        assert!(
            received as u64 * 10 >= sent * 9,
            "{path}: {received} of {sent}\n{}{}",
            a.transcript(),
            b.transcript()
        );
        drop((media, receiver));
        lab.terminate(&b);
        lab.terminate(&server);
    }
}
