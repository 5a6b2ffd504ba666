//! Packet captures of `tscf client` and `tscf server` (`--pcap FILE`): a pcapng file written by
//! a thread of its own from what the core's hosts show a [`CaptureSink`].
//!
//! The file has one interface, `tscf-inner` (link type raw IP), with the inner IP packets: a
//! client's sent into the tunnel and delivered from it, a server's relayed. With
//! `--pcap-envelopes` a second one, `tscf-envelopes` (raw IP as well), holds every envelope
//! the host sent or received, in plaintext, inside an IPv4 or IPv6 header with the outer
//! addresses and a UDP header (UDP, DTLS and QUIC transports, peer paths and sessions) or a TCP
//! segment (TCP and TLS, plain and peer streams; sequence numbers count the envelopes' octets
//! per direction). A local address the host does not know (a connection's) is the listener's
//! on a server, and port 0 on a client. Each packet's direction is in its flags (inbound,
//! outbound).
//!
//! **Captures hold the tunnel's plaintext**: the inner packets, and the envelopes before TLS,
//! DTLS or QUIC encrypts them.
//!
//! Bounded: the file stops growing at `--pcap-max-bytes` (a warning says so), and the host
//! hands records over a bounded queue that drops (and counts) what the writer cannot keep up
//! with, so that capturing never blocks the host's lock on the disk.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use etherparse::PacketBuilder;
use pcap_file::pcapng::blocks::enhanced_packet::{EnhancedPacketBlock, EnhancedPacketOption};
use pcap_file::pcapng::blocks::interface_description::{
    InterfaceDescriptionBlock, InterfaceDescriptionOption,
};
use pcap_file::pcapng::PcapNgWriter;
use pcap_file::DataLink;
use tscf_runtime_smol::core::io::{Capture, CaptureSink, CapturedEnvelope, Direction};
use tscf_runtime_smol::core::wire::Transport;

/// The default of `--pcap-max-bytes`.
pub(crate) const DEFAULT_MAX_BYTES: u64 = 100_000_000;
/// Records waiting for the writer, at most; beyond, they are dropped and counted.
const QUEUE: usize = 8192;
/// TCP flows whose sequence numbers are kept, at most (then they start again).
const MAX_FLOWS: usize = 4096;
/// What an enhanced packet block adds to its data, at most (header, padding, flags option).
const BLOCK_OVERHEAD: u64 = 48;

/// The command line's capture options.
#[derive(Clone, Debug, clap::Args)]
pub(crate) struct CaptureArgs {
    /// Write the inner IP packets to FILE (pcapng, link type raw IP). The capture holds the
    /// tunnel's plaintext.
    #[arg(long, value_name = "FILE")]
    pub(crate) pcap: Option<PathBuf>,
    /// With --pcap: also write every envelope, in plaintext, with its outer addresses (as UDP
    /// or TCP over IP, a second interface of the file).
    #[arg(long, requires = "pcap")]
    pub(crate) pcap_envelopes: bool,
    /// With --pcap: stop capturing when the file reaches this many octets.
    #[arg(long, value_name = "OCTETS", default_value_t = DEFAULT_MAX_BYTES, requires = "pcap")]
    pub(crate) pcap_max_bytes: u64,
}

/// Picks the local address of an envelope the host did not know it for.
pub(crate) type LocalOf = Box<dyn Fn(Transport, SocketAddr) -> SocketAddr + Send>;

/// A running capture: the sink for the host's configuration, and the writer to finish.
pub(crate) struct Capturing {
    sink: Arc<Sink>,
    writer: Option<JoinHandle<Written>>,
    path: PathBuf,
}

/// What the writer wrote.
struct Written {
    packets: u64,
    octets: u64,
}

impl Capturing {
    /// Creates the file and starts its writer; `None` without `--pcap`. Warns that the file
    /// will hold plaintext.
    pub(crate) fn start(args: &CaptureArgs, local_of: LocalOf) -> std::io::Result<Option<Self>> {
        let Some(path) = &args.pcap else {
            return Ok(None);
        };
        let file = File::create(path)?;
        let mut out = PcapNgWriter::new(BufWriter::new(file)).map_err(std::io::Error::other)?;
        // The section header block the writer began with, still in the buffer.
        let mut octets = out.get_ref().buffer().len() as u64;
        for name in ["tscf-inner", "tscf-envelopes"]
            .iter()
            .take(1 + usize::from(args.pcap_envelopes))
        {
            let interface = InterfaceDescriptionBlock {
                linktype: DataLink::RAW,
                snaplen: 0,
                options: vec![
                    InterfaceDescriptionOption::IfName(Cow::Borrowed(name)),
                    // Enhanced packet blocks carry nanoseconds.
                    InterfaceDescriptionOption::IfTsResol(9),
                ],
            };
            octets += out
                .write_pcapng_block(interface)
                .map_err(std::io::Error::other)? as u64;
        }
        tracing::warn!(
            file = %path.display(),
            "packet capture on: the file holds the tunnel's plaintext (inner packets{})",
            if args.pcap_envelopes { " and envelopes before encryption" } else { "" }
        );
        let (tx, rx) = sync_channel(QUEUE);
        let sink = Arc::new(Sink {
            tx,
            envelopes: args.pcap_envelopes,
            clock: (Instant::now(), SystemTime::now()),
            full: AtomicBool::new(false),
            lost: AtomicU64::new(0),
        });
        let writer = Writer {
            out,
            octets,
            max: args.pcap_max_bytes,
            flows: HashMap::new(),
            local_of,
            full: sink.clone(),
            path: path.clone(),
            packets: 0,
            scratch: Vec::new(),
        };
        let writer = std::thread::Builder::new()
            .name("tscf-pcap".into())
            .spawn(move || writer.run(rx))?;
        Ok(Some(Self {
            sink,
            writer: Some(writer),
            path: path.clone(),
        }))
    }

    /// The sink to put in the host's configuration.
    pub(crate) fn capture(&self) -> Capture {
        Capture(self.sink.clone())
    }

    /// Writes what is queued, closes the file and says what it holds.
    pub(crate) fn finish(mut self) {
        let _ = self.sink.tx.send(Record::Finish);
        let Some(written) = self.writer.take().and_then(|w| w.join().ok()) else {
            return;
        };
        let lost = self.sink.lost.load(Ordering::Relaxed);
        tracing::info!(
            file = %self.path.display(),
            packets = written.packets,
            octets = written.octets,
            "packet capture written"
        );
        if lost > 0 {
            tracing::warn!(
                file = %self.path.display(),
                lost,
                "the packet capture could not keep up and left packets out"
            );
        }
    }
}

/// What the host shows the capture, on its way to the writer.
enum Record {
    Packet {
        at: Duration,
        direction: Direction,
        data: Vec<u8>,
    },
    Envelope {
        at: Duration,
        direction: Direction,
        transport: Transport,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        data: Vec<u8>,
    },
    Finish,
}

/// The host's side: copies what it is shown into the writer's queue.
struct Sink {
    tx: SyncSender<Record>,
    envelopes: bool,
    /// One reading of both clocks, to turn the host's instants into wall-clock time.
    clock: (Instant, SystemTime),
    /// The file reached its limit: nothing more is queued.
    full: AtomicBool,
    /// Records dropped because the queue was full.
    lost: AtomicU64,
}

impl Sink {
    /// Time since the Unix epoch of `now`.
    fn at(&self, now: Instant) -> Duration {
        let (instant, system) = self.clock;
        let wall = match now.checked_duration_since(instant) {
            Some(after) => system + after,
            None => system - instant.duration_since(now),
        };
        wall.duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn queue(&self, record: Record) {
        if let Err(TrySendError::Full(_)) = self.tx.try_send(record) {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl CaptureSink for Sink {
    fn inner_packet(&self, now: Instant, direction: Direction, packet: &[u8]) {
        if self.full.load(Ordering::Relaxed) {
            return;
        }
        self.queue(Record::Packet {
            at: self.at(now),
            direction,
            data: packet.to_vec(),
        });
    }

    fn envelope(&self, now: Instant, e: &CapturedEnvelope<'_>) {
        if !self.envelopes || self.full.load(Ordering::Relaxed) {
            return;
        }
        self.queue(Record::Envelope {
            at: self.at(now),
            direction: e.direction,
            transport: e.transport,
            local: e.local,
            remote: e.remote,
            data: e.envelope.to_vec(),
        });
    }
}

/// The writer thread's state.
struct Writer {
    out: PcapNgWriter<BufWriter<File>>,
    octets: u64,
    max: u64,
    /// The next sequence number of each TCP direction (source, destination).
    flows: HashMap<(SocketAddr, SocketAddr), u32>,
    local_of: LocalOf,
    full: Arc<Sink>,
    path: PathBuf,
    packets: u64,
    scratch: Vec<u8>,
}

impl Writer {
    fn run(mut self, rx: Receiver<Record>) -> Written {
        'records: while let Ok(record) = rx.recv() {
            let mut next = Some(record);
            while let Some(record) = next.take() {
                match record {
                    Record::Finish => break 'records,
                    record => {
                        if !self.write(record) {
                            self.stop();
                            break 'records;
                        }
                    }
                }
                next = rx.try_recv().ok();
            }
            let _ = self.out.get_mut().flush();
        }
        let _ = self.out.get_mut().flush();
        Written {
            packets: self.packets,
            octets: self.octets,
        }
    }

    /// The file is full: no more records are queued.
    fn stop(&mut self) {
        self.full.full.store(true, Ordering::Relaxed);
        tracing::warn!(
            file = %self.path.display(),
            max = self.max,
            "packet capture stopped: the file reached --pcap-max-bytes"
        );
    }

    /// Writes one record; false once the file would pass its limit.
    fn write(&mut self, record: Record) -> bool {
        let (interface, at, direction) = match &record {
            Record::Packet { at, direction, .. } => (0, *at, *direction),
            Record::Envelope { at, direction, .. } => (1, *at, *direction),
            Record::Finish => return true,
        };
        let data = match record {
            Record::Packet { data, .. } => data,
            Record::Envelope {
                direction,
                transport,
                local,
                remote,
                data,
                ..
            } => match self.outer(direction, transport, local, remote, &data) {
                Some(packet) => packet,
                // Too large for one IP packet: left out.
                None => return true,
            },
            Record::Finish => return true,
        };
        if self.octets + data.len() as u64 + BLOCK_OVERHEAD > self.max {
            return false;
        }
        let block = EnhancedPacketBlock {
            interface_id: interface,
            timestamp: at,
            original_len: data.len() as u32,
            data: Cow::Borrowed(&data),
            options: vec![EnhancedPacketOption::Flags(match direction {
                Direction::Received => 1,
                Direction::Sent => 2,
            })],
        };
        match self.out.write_pcapng_block(block) {
            Ok(n) => {
                self.octets += n as u64;
                self.packets += 1;
                true
            }
            Err(e) => {
                tracing::warn!(file = %self.path.display(), error = %e, "packet capture failed");
                false
            }
        }
    }

    /// The envelope in an IP packet with its outer addresses: UDP, or a TCP segment for
    /// stream transports.
    fn outer(
        &mut self,
        direction: Direction,
        transport: Transport,
        local: Option<SocketAddr>,
        remote: SocketAddr,
        envelope: &[u8],
    ) -> Option<Vec<u8>> {
        let mut local = local.unwrap_or_else(|| (self.local_of)(transport, remote));
        if local.is_ipv4() != remote.is_ipv4() {
            local = SocketAddr::new(unspecified_like(remote.ip()), local.port());
        }
        let (from, to) = match direction {
            Direction::Sent => (local, remote),
            Direction::Received => (remote, local),
        };
        let ip = match (from.ip(), to.ip()) {
            (IpAddr::V4(a), IpAddr::V4(b)) => PacketBuilder::ipv4(a.octets(), b.octets(), 64),
            (IpAddr::V6(a), IpAddr::V6(b)) => PacketBuilder::ipv6(a.octets(), b.octets(), 64),
            _ => return None,
        };
        self.scratch.clear();
        let written = if matches!(transport, Transport::TCP | Transport::TLS) {
            if self.flows.len() >= MAX_FLOWS {
                self.flows.clear();
            }
            let seq = *self.flows.entry((from, to)).or_insert(1);
            let ack = *self.flows.entry((to, from)).or_insert(1);
            self.flows
                .insert((from, to), seq.wrapping_add(envelope.len() as u32));
            let tcp = ip.tcp(from.port(), to.port(), seq, 65_535).ack(ack).psh();
            tcp.write(&mut self.scratch, envelope)
        } else {
            ip.udp(from.port(), to.port())
                .write(&mut self.scratch, envelope)
        };
        written.ok().map(|()| self.scratch.clone())
    }
}

fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// A client's local address for a connection the host does not know it of: loopback for a
/// server on loopback, else unspecified, with port 0.
pub(crate) fn client_local(_: Transport, remote: SocketAddr) -> SocketAddr {
    let ip = match remote.ip() {
        ip if ip.is_loopback() => ip,
        ip => unspecified_like(ip),
    };
    SocketAddr::new(ip, 0)
}
