//! What a host asks of the runtime that drives it, and what the runtime tells it back.
//!
//! A *host* ([`ServerHost`](crate::server::ServerHost), [`ClientHost`](crate::tunnel::ClientHost))
//! is a state machine of the core together with everything it decides about sockets: which
//! datagram on a shared UDP socket goes where, which address may reach a session, how a byte
//! stream is cut into envelopes, how much may wait for a slow connection and for how long. The
//! runtime that drives it owns the sockets, the TLS and QUIC sessions, the threads or tasks and
//! the clock, and only moves bytes:
//!
//! - it reads a datagram from a [`SocketId`] and hands it over as [`Input::Datagram`]; it sends
//!   every [`Transmit`] the host polls. Datagrams come and go in batches where the system
//!   allows: a runtime that reads several at once (`recvmmsg`, UDP GRO) into [`RecvBuffers`]
//!   feeds them all under one lock with [`Driven::datagrams`] and drains once, and the drain
//!   joins consecutive datagrams to one destination into one send ([`Driver::max_segments`],
//!   UDP GSO);
//! - it connects the streams the host asks for ([`IoEvent::Connect`]) and accepts those its
//!   listeners take (after asking the host, which may refuse), runs their TLS handshake, and
//!   reports [`Input::StreamOpen`], [`Input::StreamData`] and [`Input::StreamClosed`];
//! - it writes what the host queues for a stream: after [`IoEvent::StreamReady`] it takes the
//!   bytes with the host's `take_output` and writes them, and asks again once they are written;
//! - it closes what the host closes ([`IoEvent::CloseStream`], [`IoEvent::CloseSocket`]), at
//!   once when told to abort, even while a write is blocked.
//!
//! Every host follows the shape of the core's state machines: after any input, drain
//! `poll_transmit` and `poll_event` until both return `None`, then arm a timer for
//! `poll_timeout`.

use core::fmt;
use core::net::SocketAddr;
use std::io::{self, IoSliceMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::wire::Transport;

/// A UDP socket the runtime owns for a host: a server's UDP or DTLS listener, a client's peer
/// socket, or the socket of a client's DTLS transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u32);

/// A byte stream the runtime owns for a host: a TCP connection (plain or with TLS), or a QUIC
/// connection with its one stream. Ids are never reused while the host knows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamId(pub u64);

impl fmt::Display for StreamId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "stream {}", self.0)
    }
}

/// What the runtime reports to a host. Pass it to the host's `handle_input` with the time it
/// happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Input<'a> {
    /// A datagram arrived on `socket` from `from`.
    Datagram {
        /// The socket it arrived on.
        socket: SocketId,
        /// Its source address.
        from: SocketAddr,
        /// Its payload.
        data: &'a [u8],
    },
    /// The stream is connected and, for TLS and QUIC, its handshake is done: one the host
    /// asked for with [`IoEvent::Connect`], or one a listener accepted.
    StreamOpen {
        /// The stream.
        stream: StreamId,
        /// Whether the peer presented a certificate the TLS layer verified (mutual TLS).
        verified_identity: bool,
    },
    /// Bytes read from the stream.
    StreamData {
        /// The stream.
        stream: StreamId,
        /// What was read.
        data: &'a [u8],
    },
    /// One QUIC datagram (RFC 9221) received on the stream's connection.
    StreamDatagram {
        /// The stream.
        stream: StreamId,
        /// The datagram.
        data: &'a [u8],
    },
    /// The stream ended or could not be opened; the host forgets it. Also reported for a
    /// stream the host asked to close, once it is closed.
    StreamClosed {
        /// The stream.
        stream: StreamId,
        /// Why, if it did not end cleanly.
        error: Option<StreamError>,
        /// What the runtime knows of why, as text (a TLS alert, a certificate that does not
        /// match its pin): what the user sees as the last failure.
        detail: Option<&'a str>,
    },
    /// The socket asked for with [`IoEvent::BindSocket`] is bound to `local`.
    SocketBound {
        /// The socket.
        socket: SocketId,
        /// Its local address.
        local: SocketAddr,
    },
    /// The socket asked for with [`IoEvent::BindSocket`] could not be bound.
    SocketFailed {
        /// The socket.
        socket: SocketId,
        /// Why, as text.
        error: &'a str,
    },
    /// Sending a transmit failed at the socket (counted; loss is the protocol's to notice).
    SendFailed,
    /// A [`Transmit::QuicDatagram`] did not fit in a QUIC datagram now: the host queues
    /// `envelope` on the stream instead, within the stream's bound.
    QuicFallback {
        /// The stream.
        stream: StreamId,
        /// The envelope.
        envelope: &'a [u8],
    },
    /// The QUIC peer session on `path` finished its handshake with the pinned certificate.
    SessionOpen {
        /// The peer's address on the direct path.
        path: SocketAddr,
    },
    /// The QUIC peer session on `path` ended or could not be set up.
    SessionClosed {
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// Whether its handshake failed (counted), rather than an open session ending.
        failed: bool,
    },
    /// An envelope for the QUIC peer session on `path` did not fit in a QUIC datagram and went
    /// on the session's stream, or was dropped because that stream's queue was full (both
    /// counted).
    SessionStream {
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// Whether it was dropped.
        dropped: bool,
    },
    /// One envelope carried by the QUIC peer session on `path`.
    SessionData {
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// The envelope.
        data: &'a [u8],
    },
}

/// Why a stream ended badly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamError {
    /// The connection could not be made (refused, unreachable, timed out).
    Connect,
    /// The TLS or QUIC handshake failed (a bad certificate, an alert, garbage).
    Handshake,
    /// The connection failed or was reset after it was open.
    Io,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connect => "connection failed",
            Self::Handshake => "handshake failed",
            Self::Io => "connection lost",
        })
    }
}

/// How a stream the host asks for is secured: the host has chosen the rustls configuration
/// and the name to verify, so the runtime only runs the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Security {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls(ClientTls),
    /// A QUIC connection (ALPN `tscf`) with these limits, and the one stream the client
    /// opens.
    Quic(ClientTls, QuicLimits),
}

impl Security {
    /// The transport this security stands for.
    pub fn transport(&self) -> Transport {
        match self {
            Self::Tcp => Transport::TCP,
            Self::Tls(_) => Transport::TLS,
            Self::Quic(..) => Transport::QUIC,
        }
    }
}

/// The client side of a TLS or QUIC handshake: the server's settings for a transport to the
/// server, or the certificate pinned through the director for a peer stream.
#[derive(Clone, Debug)]
pub struct ClientTls {
    /// The rustls configuration.
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate is verified for.
    pub name: rustls::pki_types::ServerName<'static>,
}

/// The same configuration (the same allocation) and the same name.
impl PartialEq for ClientTls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.name == other.name
    }
}

impl Eq for ClientTls {}

/// The QUIC transport parameters (RFC 9000 §18.2) a runtime sets on every QUIC connection it
/// runs for a host: what the other side may make it buffer, and how long a connection lives
/// without traffic. A tscf QUIC connection carries one bidirectional stream, opened by the
/// client; the other side may open no other stream (`initial_max_streams_bidi` 1 to a client,
/// 0 to a server, and `initial_max_streams_uni` 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuicLimits {
    /// Octets the other side may send on the stream ahead of what was read (default 131,070:
    /// two maximal envelopes, `docs/PROTOCOL.md` §2.1).
    pub stream_window: u32,
    /// Octets across the connection's streams ahead of what was read (default 131,070).
    pub connection_window: u32,
    /// Octets of received QUIC datagrams waiting to be read (default 131,070); beyond, the
    /// oldest are dropped.
    pub datagram_buffer: u32,
    /// Octets written to the stream and not yet acknowledged that the connection keeps
    /// (default 262,144); beyond, the writer waits, and a writer that waits past its deadline
    /// loses the connection.
    pub send_window: u32,
    /// A connection with no packet in either direction for this long is closed (default 30 s).
    pub idle_timeout: Duration,
    /// A connection sends a PING when it has sent nothing for this long (default 10 s), so
    /// that a tunnel quiet for its whole keepalive interval stays open.
    pub keep_alive: Duration,
}

impl QuicLimits {
    /// Bidirectional streams a client may open: the tunnel's (or session's) one stream.
    pub const CLIENT_STREAMS: u32 = 1;
}

impl Default for QuicLimits {
    fn default() -> Self {
        Self {
            stream_window: 131_070,
            connection_window: 131_070,
            datagram_buffer: 131_070,
            send_window: 262_144,
            idle_timeout: Duration::from_secs(30),
            keep_alive: Duration::from_secs(10),
        }
    }
}

/// What a host asks of the runtime's sockets and streams. Carried by each host's event type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// Connect a stream as [`Connect`] says, then report [`Input::StreamOpen`] or
    /// [`Input::StreamClosed`].
    Connect(Connect),
    /// Bytes wait for `stream`: take them with the host's `take_output` and write them.
    StreamReady {
        /// The stream.
        stream: StreamId,
    },
    /// Close `stream`. With `abort`, at once, as a network failure would (no TLS
    /// close_notify, nothing more written, a blocked write ended); otherwise after writing
    /// what `take_output` still gives. Report [`Input::StreamClosed`] once it is closed.
    CloseStream {
        /// The stream.
        stream: StreamId,
        /// End it at once.
        abort: bool,
        /// Why, for a transport that tells the other side (QUIC's application close code).
        reason: CloseReason,
    },
    /// Bind a new UDP socket of `remote`'s address family (unspecified address, any port)
    /// for `socket`, then report [`Input::SocketBound`] or [`Input::SocketFailed`].
    BindSocket {
        /// The socket's id.
        socket: SocketId,
        /// The address it will talk to.
        remote: SocketAddr,
    },
    /// Close `socket`, after sending the transmits polled before this event.
    CloseSocket {
        /// The socket.
        socket: SocketId,
    },
}

/// Why a host closes a stream ([`IoEvent::CloseStream`]). A QUIC connection carries it as the
/// application error code of its CONNECTION_CLOSE ([`quic_code`](Self::quic_code),
/// `docs/PROTOCOL.md` §2.7); other transports cannot say it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CloseReason {
    /// An orderly end: the tunnel was released or moved elsewhere, went silent, or its
    /// notification was acknowledged.
    #[default]
    Closed,
    /// The other side broke the protocol: it lost the stream's framing (§2.1).
    ProtocolError,
    /// The server is shutting down.
    Shutdown,
    /// The server reclaimed the connection's slot: its handshake or configuration did not
    /// complete in time, a newer connection needed the slot, it stopped reading, or it did
    /// not let a close complete.
    Reclaimed,
}

impl CloseReason {
    /// The QUIC application error code: 0 closed, 1 protocol error, 2 shutdown, 3 reclaimed.
    pub fn quic_code(self) -> u32 {
        match self {
            Self::Closed => 0,
            Self::ProtocolError => 1,
            Self::Shutdown => 2,
            Self::Reclaimed => 3,
        }
    }
}

/// A stream the host asks the runtime to connect ([`IoEvent::Connect`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The new stream's id.
    pub stream: StreamId,
    /// Where to.
    pub to: SocketAddr,
    /// How to secure it.
    pub security: Security,
    /// Bound of the connect and the handshake together.
    pub timeout: Duration,
}

/// Where the bytes a host's `poll_transmit` wrote go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Transmit {
    /// One UDP datagram from `socket` to `to`.
    Datagram {
        /// The socket to send from.
        socket: SocketId,
        /// The destination.
        to: SocketAddr,
    },
    /// One QUIC datagram on `stream`'s connection; when the connection takes no datagram that
    /// large now, the runtime answers [`Sent::NotDatagram`] and the host queues it on the
    /// stream ([`Input::QuicFallback`]).
    QuicDatagram {
        /// The stream of the QUIC connection.
        stream: StreamId,
    },
    /// One envelope inside the QUIC peer session on `path`.
    PeerSession {
        /// The peer's address on the direct path.
        path: SocketAddr,
    },
}

/// Where a captured packet or envelope went, seen from the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Sent by this host.
    Sent,
    /// Received by this host.
    Received,
}

/// One envelope a host sent or received, as a capture sees it: in plaintext (before a TLS,
/// DTLS or QUIC session encrypts it, after it decrypts it), with the outer addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CapturedEnvelope<'a> {
    /// Sent or received.
    pub direction: Direction,
    /// The transport it went over (the stream or session's, not the plaintext's).
    pub transport: Transport,
    /// The host's own address, when the host knows it (a UDP or DTLS socket's); `None` for
    /// stream connections, whose local address only the runtime knows.
    pub local: Option<SocketAddr>,
    /// The other end's address.
    pub remote: SocketAddr,
    /// The whole envelope, header included.
    pub envelope: &'a [u8],
}

/// What a host shows a packet capture: the inner IP packets it carries and the envelopes it
/// exchanges. The runtime gives one to the host in its configuration ([`Capture`]); the host
/// calls it with the lock held, so a sink only copies what it is shown and writes elsewhere.
/// Without one the host does nothing of this (a check of an `Option` per packet).
///
/// **Captures hold plaintext**: the inner packets and the envelopes before encryption.
pub trait CaptureSink: Send + Sync {
    /// An inner IP packet: sent into the tunnel or delivered from it (a client), or relayed
    /// (a server, once per packet, as it leaves for its destination).
    fn inner_packet(&self, now: Instant, direction: Direction, packet: &[u8]);
    /// An envelope sent or received.
    fn envelope(&self, now: Instant, envelope: &CapturedEnvelope<'_>);
}

/// A [`CaptureSink`] for a host's configuration (shared, so that configurations stay
/// clonable).
#[derive(Clone)]
pub struct Capture(pub std::sync::Arc<dyn CaptureSink>);

impl fmt::Debug for Capture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Capture")
    }
}

impl Capture {
    /// Shows `packet` to the sink, if there is one.
    pub(crate) fn inner_packet(
        capture: &Option<Self>,
        now: Instant,
        direction: Direction,
        packet: &[u8],
    ) {
        if let Some(c) = capture {
            c.0.inner_packet(now, direction, packet);
        }
    }

    /// Shows an envelope to the sink, if there is one.
    pub(crate) fn envelope(capture: &Option<Self>, now: Instant, envelope: CapturedEnvelope<'_>) {
        if let Some(c) = capture {
            c.0.envelope(now, &envelope);
        }
    }
}

/// What every host offers its runtime, so that one drive loop serves them all.
pub trait Host {
    /// What the host reports: the runtime's work ([`IoEvent`]) and the host's own news.
    type Event;

    /// Something happened on a socket or stream.
    fn handle_input(&mut self, now: Instant, input: Input<'_>);
    /// Runs what is due at `now`.
    fn handle_timeout(&mut self, now: Instant);
    /// Writes the next datagram into `buf` and says where it goes.
    fn poll_transmit(&mut self, now: Instant, buf: &mut Vec<u8>) -> Option<Transmit>;
    /// The next event.
    fn poll_event(&mut self) -> Option<Self::Event>;
    /// When [`handle_timeout`](Self::handle_timeout) is next due.
    fn poll_timeout(&self) -> Option<Instant>;
    /// Hands the runtime what waits for `stream` (see [`IoEvent::StreamReady`]).
    fn take_output(&mut self, now: Instant, stream: StreamId, out: &mut Vec<u8>) -> bool;
    /// The socket and stream work among the host's events: `event` as such, or given back.
    fn io_event(event: Self::Event) -> Result<IoEvent, Self::Event>;
    /// A listener of the runtime accepted a TCP connection of `transport` from `remote`: its
    /// stream id, or `None` if it must be closed at once (counted).
    fn accept(
        &mut self,
        now: Instant,
        transport: Transport,
        remote: SocketAddr,
    ) -> Option<StreamId>;
}

/// What a runtime does with a host's output: it sends the datagrams and acts on the events.
pub trait Driver<H: Host> {
    /// Sends the bytes of one transmit.
    ///
    /// For a [`Transmit::Datagram`], `bytes` may hold several datagrams to the same
    /// destination, back to back: each `segment` octets long but the last, which may be
    /// shorter (what UDP GSO sends in one system call). There are never more than
    /// [`max_segments`](Self::max_segments) of them; for any other transmit `segment` is the
    /// length of `bytes`.
    fn send(&mut self, transmit: Transmit, bytes: &[u8], segment: usize) -> Sent;
    /// How many datagrams of one [`Transmit::Datagram`] the driver sends in one call, at
    /// most: 1 (the default) when it sends each on its own.
    fn max_segments(&self, transmit: &Transmit) -> usize {
        let _ = transmit;
        1
    }
    /// Starts connecting a stream ([`IoEvent::Connect`]); `Err` if it cannot even start (the
    /// host is told the stream closed).
    fn connect(&mut self, connect: Connect) -> Result<(), String>;
    /// Bytes wait for `stream` ([`IoEvent::StreamReady`]): wake its writer.
    fn stream_ready(&mut self, stream: StreamId);
    /// Closes `stream` ([`IoEvent::CloseStream`]), telling the other side `reason` where the
    /// transport can.
    fn close_stream(&mut self, stream: StreamId, abort: bool, reason: CloseReason);
    /// Binds a UDP socket for `socket` ([`IoEvent::BindSocket`]) and starts reading it; its
    /// local address.
    fn bind_socket(&mut self, socket: SocketId, remote: SocketAddr) -> io::Result<SocketAddr>;
    /// Closes `socket` ([`IoEvent::CloseSocket`]).
    fn close_socket(&mut self, socket: SocketId);
    /// Acts on an event of the host that is not socket or stream work. The host is lent
    /// back for what the event causes at once.
    fn on_event(&mut self, host: &mut H, now: Instant, event: H::Event);
}

/// What became of a transmit the driver was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sent {
    /// Handed to the socket or the connection.
    Done,
    /// Refused (a full socket buffer, a closed socket or session): the host counts a send
    /// error ([`Input::SendFailed`]).
    Failed,
    /// A [`Transmit::QuicDatagram`] the connection takes no datagram that large for now: the
    /// host queues it on the stream ([`Input::QuicFallback`]).
    NotDatagram,
    /// A [`Transmit::PeerSession`] too large for a datagram: the runtime queued it on the
    /// session's stream, or dropped it because that queue was full
    /// ([`Input::SessionStream`]).
    SessionStream {
        /// Whether it was dropped.
        dropped: bool,
    },
}

/// Acts on one event of `host` through `driver`, and reports to the host what happened at
/// once: a socket bound or not, a stream that could not start connecting.
pub fn act<H: Host>(host: &mut H, driver: &mut impl Driver<H>, now: Instant, event: H::Event) {
    let io = match H::io_event(event) {
        Ok(io) => io,
        Err(event) => return driver.on_event(host, now, event),
    };
    match io {
        IoEvent::Connect(connect) => {
            let stream = connect.stream;
            if let Err(why) = driver.connect(connect) {
                let closed = Input::StreamClosed {
                    stream,
                    error: Some(StreamError::Connect),
                    detail: Some(&why),
                };
                host.handle_input(now, closed);
            }
        }
        IoEvent::StreamReady { stream } => driver.stream_ready(stream),
        IoEvent::CloseStream {
            stream,
            abort,
            reason,
        } => driver.close_stream(stream, abort, reason),
        IoEvent::BindSocket { socket, remote } => match driver.bind_socket(socket, remote) {
            Ok(local) => host.handle_input(now, Input::SocketBound { socket, local }),
            Err(error) => {
                let error = error.to_string();
                host.handle_input(
                    now,
                    Input::SocketFailed {
                        socket,
                        error: &error,
                    },
                );
            }
        },
        IoEvent::CloseSocket { socket } => driver.close_socket(socket),
    }
}

/// The largest UDP payload over IPv4, and so the most one send of joined datagrams carries.
const MAX_BATCH_OCTETS: usize = 65_507;

/// The drain's buffers: the transmit polled first, the datagrams joined to it for one send,
/// and the transmit polled after them that could not join them (it starts the next send).
/// Kept between drains, so that sending allocates nothing: the host may swap the buffers it
/// writes into for its own (its queues hand over their frames that way), so they only ever
/// hold one datagram, and the joined datagrams gather in a buffer the host never sees, which
/// keeps its capacity.
#[derive(Debug, Default)]
pub struct Batch {
    first: Vec<u8>,
    next: Vec<u8>,
    joined: Vec<u8>,
    /// Whether the last send is in `joined` (more than one datagram) or in `first`.
    is_joined: bool,
    pending: Option<Transmit>,
}

impl Batch {
    /// Polls the host's next transmit and joins the datagrams that follow it to the same
    /// socket and destination, as many as `driver` sends at once, while they are as long as
    /// the first (the last of them may be shorter). Returns the transmit and the segment
    /// length; the bytes are in [`bytes`](Self::bytes).
    pub fn poll<H: Host>(
        &mut self,
        host: &mut H,
        driver: &impl Driver<H>,
        now: Instant,
    ) -> Option<(Transmit, usize)> {
        let first = match self.pending.take() {
            Some(pending) => {
                core::mem::swap(&mut self.first, &mut self.next);
                pending
            }
            None => host.poll_transmit(now, &mut self.first)?,
        };
        self.is_joined = false;
        let segment = self.first.len();
        let max = match first {
            Transmit::Datagram { .. } if segment > 0 => {
                driver.max_segments(&first).min(MAX_BATCH_OCTETS / segment)
            }
            _ => 1,
        };
        for _ in 1..max {
            let Some(next) = host.poll_transmit(now, &mut self.next) else {
                break;
            };
            if next != first || self.next.is_empty() || self.next.len() > segment {
                self.pending = Some(next);
                break;
            }
            if !self.is_joined {
                self.joined.clear();
                self.joined.extend_from_slice(&self.first);
                self.is_joined = true;
            }
            self.joined.extend_from_slice(&self.next);
            if self.next.len() < segment {
                break;
            }
        }
        Some((first, segment))
    }

    /// The bytes of the transmit [`poll`](Self::poll) returned last.
    pub fn bytes(&self) -> &[u8] {
        if self.is_joined {
            &self.joined
        } else {
            &self.first
        }
    }
}

/// The drain every runtime runs after an input at `now`: the host's transmits are sent, then
/// one event is acted on ([`act`]), until the host has neither left. What the driver says of a
/// send is reported to the host ([`Sent`]). Consecutive datagrams to one destination go out
/// together ([`Batch::poll`]); every transmit polled before an event is sent before it is
/// acted on.
pub fn drain<H: Host>(host: &mut H, driver: &mut impl Driver<H>, now: Instant, batch: &mut Batch) {
    loop {
        while let Some((transmit, segment)) = batch.poll(host, driver, now) {
            match (driver.send(transmit, batch.bytes(), segment), transmit) {
                (Sent::Done, _) => {}
                (Sent::NotDatagram, Transmit::QuicDatagram { stream }) => {
                    let fallback = Input::QuicFallback {
                        stream,
                        envelope: batch.bytes(),
                    };
                    host.handle_input(now, fallback);
                }
                (Sent::SessionStream { dropped }, Transmit::PeerSession { path }) => {
                    host.handle_input(now, Input::SessionStream { path, dropped });
                }
                _ => host.handle_input(now, Input::SendFailed),
            }
        }
        match host.poll_event() {
            Some(event) => act(host, driver, now, event),
            None => return,
        }
    }
}

/// Buffers for reading several datagrams in one system call (`recvmmsg`), each slot large
/// enough for the largest datagram or for the datagrams UDP GRO joined. One slot at first (GRO
/// still joins a burst from one sender into it); the slots double, up to
/// [`RecvBuffers::MAX_SLOTS`], each time [`RecvBuffers::GROW_AFTER`] reads in a row filled them
/// all, so that a quiet socket or a tunnel that only connects holds one.
#[derive(Debug)]
pub struct RecvBuffers {
    buf: Vec<u8>,
    /// Reads in a row that filled every slot.
    full_reads: u32,
}

impl Default for RecvBuffers {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBuffers {
    /// Datagrams of one read a runtime hands the host first ([`hand_over`](Self::hand_over)).
    pub const HAND_OVER: usize = 8;
    /// Octets of one slot: the largest UDP datagram, or what GRO joins at most.
    pub const SLOT: usize = 64 * 1024;
    /// Slots at most: what one `recvmmsg` reads.
    pub const MAX_SLOTS: usize = 32;
    /// Reads in a row that fill every slot before the slots double.
    pub const GROW_AFTER: u32 = 8;

    /// How many of a read's datagrams a runtime hands the host next ([`Driven::datagrams`],
    /// under one lock and followed by one drain), `handed` being how many it has handed:
    /// [`HAND_OVER`](Self::HAND_OVER) at first, then as many as so far (8, 8, 16, 32 of a
    /// read of 64). In between, the application and other sockets run. A read of 64 handed
    /// over whole leaves the application nothing until the last is delivered, and its
    /// answers (acknowledgements, credits) start only then, while the sender waits for them:
    /// in the `bench`, 1,200-octet datagrams over a peer tunnel went 2.4 times as fast in
    /// growing hand-overs, and over the relay 1.2 times. Eight at a time throughout did as
    /// well for datagrams but polled the inner TCP stack, and sent its acknowledgements, after
    /// every eight: inner TCP lost a tenth.
    pub fn hand_over(handed: usize) -> usize {
        handed.max(Self::HAND_OVER)
    }

    /// One slot.
    pub fn new() -> Self {
        Self {
            buf: vec![0; Self::SLOT],
            full_reads: 0,
        }
    }

    /// How many slots there are now.
    pub fn slots(&self) -> usize {
        self.buf.len() / Self::SLOT
    }

    /// The slots to read into: the first [`slots`](Self::slots), then empty ones.
    pub fn slices(&mut self) -> [IoSliceMut<'_>; Self::MAX_SLOTS] {
        let mut chunks = self.buf.chunks_mut(Self::SLOT);
        core::array::from_fn(|_| IoSliceMut::new(chunks.next().unwrap_or_default()))
    }

    /// Every datagram a read left, with its sender: `reads` says, slot by slot from the
    /// first, who sent what the slot holds, its length and its stride (see
    /// [`datagrams`](Self::datagrams)).
    pub fn received<'a>(
        &'a self,
        reads: impl IntoIterator<Item = (SocketAddr, usize, usize)> + 'a,
    ) -> impl Iterator<Item = (SocketAddr, &'a [u8])> + 'a {
        let slots = reads.into_iter().enumerate();
        slots.flat_map(move |(slot, (from, len, stride))| {
            self.datagrams(slot, len, stride).map(move |d| (from, d))
        })
    }

    /// The datagrams a read left in `slot`: `len` octets, each datagram `stride` long but the
    /// last (more than one only where GRO joined them).
    pub fn datagrams(&self, slot: usize, len: usize, stride: usize) -> impl Iterator<Item = &[u8]> {
        let start = (slot * Self::SLOT).min(self.buf.len());
        let end = (start + len.min(Self::SLOT)).min(self.buf.len());
        self.buf[start..end].chunks(stride.max(1))
    }

    /// A read filled `filled` slots: after [`GROW_AFTER`](Self::GROW_AFTER) reads in a row
    /// that filled them all, there are twice as many.
    pub fn filled(&mut self, filled: usize) {
        let slots = self.slots();
        if filled < slots {
            self.full_reads = 0;
            return;
        }
        self.full_reads += 1;
        if self.full_reads >= Self::GROW_AFTER && slots < Self::MAX_SLOTS {
            self.full_reads = 0;
            self.buf
                .resize((slots * 2).min(Self::MAX_SLOTS) * Self::SLOT, 0);
        }
    }
}

/// A host and the runtime's driver of it, as the runtime keeps them behind its lock: every
/// input goes through [`run`](Self::run), which drains the host after it, and the runtime's
/// timer asks [`on_timer`](Self::on_timer) what to do and how long to sleep.
#[derive(Debug)]
pub struct Driven<H, D> {
    /// The host.
    pub host: H,
    /// The runtime's driver: its sockets, streams and channels.
    pub driver: D,
    batch: Batch,
    /// The deadline the runtime's timer sleeps to, if it sleeps.
    armed: Option<Instant>,
}

impl<H: Host, D: Driver<H>> Driven<H, D> {
    /// `host` driven by `driver`.
    pub fn new(host: H, driver: D) -> Self {
        Self {
            host,
            driver,
            batch: Batch::default(),
            armed: None,
        }
    }

    /// Runs `input` at `now`, then drains the host ([`drain`]). Returns what `input` returned,
    /// and whether the runtime must wake its timer: the host's next deadline is now earlier
    /// than the one the timer sleeps to.
    pub fn run<R>(
        &mut self,
        now: Instant,
        input: impl FnOnce(&mut H, &mut D, Instant) -> R,
    ) -> (R, bool) {
        let r = input(&mut self.host, &mut self.driver, now);
        (r, self.drain(now))
    }

    /// Hands the host a datagram that `socket` received from `from` at `now`, then drains it;
    /// true if the runtime must wake its timer.
    pub fn datagram(
        &mut self,
        now: Instant,
        socket: SocketId,
        from: SocketAddr,
        data: &[u8],
    ) -> bool {
        let datagram = Input::Datagram { socket, from, data };
        self.host.handle_input(now, datagram);
        self.drain(now)
    }

    /// Drains the host after an input at `now`; true if the runtime must wake its timer.
    pub fn drain(&mut self, now: Instant) -> bool {
        drain(&mut self.host, &mut self.driver, now, &mut self.batch);
        self.timer_behind()
    }

    /// Hands the host every datagram of one read from `socket` at `now`, each from its
    /// source address, then drains it once: what the host sends in answer goes out in
    /// batches too. True if the runtime must wake its timer.
    pub fn datagrams<'a>(
        &mut self,
        now: Instant,
        socket: SocketId,
        datagrams: impl IntoIterator<Item = (SocketAddr, &'a [u8])>,
    ) -> bool {
        for (from, data) in datagrams {
            let input = Input::Datagram { socket, from, data };
            self.host.handle_input(now, input);
        }
        self.drain(now)
    }

    /// Whether the host's next deadline is earlier than the one the runtime's timer sleeps to.
    pub fn timer_behind(&self) -> bool {
        let due = self.host.poll_timeout();
        due.is_some_and(|d| self.armed.is_none_or(|a| d < a))
    }

    /// The runtime's timer woke at `now`: runs the host's timers if they are due, and returns
    /// the deadline to sleep to (`None`: no timer runs), which it remembers. A deadline at or
    /// before `now` asks for another call at once.
    pub fn on_timer(&mut self, now: Instant) -> Option<Instant> {
        if self.host.poll_timeout().is_some_and(|at| at <= now) {
            self.host.handle_timeout(now);
            drain(&mut self.host, &mut self.driver, now, &mut self.batch);
        }
        self.armed = self.host.poll_timeout();
        self.armed
    }
}

/// What a runtime gives the [`Shared`] state of its threads or tasks: the clock, and its ways
/// of waking them.
pub trait Runtime {
    /// The current time.
    fn now(&self) -> Instant;
    /// Wakes the timer: the host's next deadline is earlier than the one it sleeps to.
    fn wake_timer(&self);
    /// Wakes whoever waits for the host's state to change (a connect, a close).
    fn notify_changed(&self);
}

/// A host and its driver behind a lock, with the runtime's clock and wake-ups: what a
/// runtime's threads or tasks share. The lock is held only for the host's synchronous calls.
#[derive(Debug)]
pub struct Shared<H, D, R> {
    /// The host and the driver.
    pub state: Mutex<Driven<H, D>>,
    /// The runtime's clock and wake-ups.
    pub runtime: R,
}

impl<H: Host, D: Driver<H>, R: Runtime> Shared<H, D, R> {
    /// `host` driven by `driver` in `runtime`.
    pub fn new(host: H, driver: D, runtime: R) -> Self {
        Self {
            state: Mutex::new(Driven::new(host, driver)),
            runtime,
        }
    }

    /// Locks the state, going on if a thread panicked while holding it: every input leaves
    /// the host consistent.
    pub fn lock(&self) -> MutexGuard<'_, Driven<H, D>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `input` on the host now, then drains it and wakes what must wake.
    pub fn drive<T>(&self, input: impl FnOnce(&mut H, &mut D, Instant) -> T) -> T {
        let mut state = self.lock();
        let (r, behind) = state.run(self.runtime.now(), input);
        self.woken(behind);
        r
    }

    /// Drains the host after an input at `now` made with the lock held.
    pub fn drain(&self, state: &mut Driven<H, D>, now: Instant) {
        let behind = state.drain(now);
        self.woken(behind);
    }

    /// Wakes the timer if it sleeps past the host's next deadline (`behind`), and whoever
    /// waits for a change.
    pub fn woken(&self, behind: bool) {
        if behind {
            self.runtime.wake_timer();
        }
        self.runtime.notify_changed();
    }
}

/// The bytes waiting to be written to one stream: whole envelopes, in order, up to a bound.
///
/// Envelopes are appended as they are polled from the state machine; the runtime takes
/// everything at once with [`take`](Self::take), so that a busy stream writes many envelopes
/// in one system call (and one TLS record per 16 KiB) while a lone one is written at once.
#[derive(Debug, Default)]
pub(crate) struct StreamOutput {
    queued: Vec<u8>,
    /// Taken by the runtime and not yet reported written (it has not asked again).
    in_flight: bool,
}

/// Capacity kept by an emptied output buffer: a quiet stream gives back what a burst grew.
const KEEP_OUTPUT: usize = 16 * 1024;

impl StreamOutput {
    /// Appends `envelope` unless `bound` octets would then be waiting; false if it did not fit.
    pub(crate) fn push(&mut self, envelope: &[u8], bound: usize) -> bool {
        if self.queued.len() + envelope.len() > bound {
            return false;
        }
        self.queued.extend_from_slice(envelope);
        true
    }

    /// Octets waiting (not those the runtime is writing).
    pub(crate) fn len(&self) -> usize {
        self.queued.len()
    }

    /// Whether nothing waits.
    pub(crate) fn is_empty(&self) -> bool {
        self.queued.is_empty()
    }

    /// Whether the runtime holds bytes it has not finished writing.
    pub(crate) fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Hands everything waiting to the runtime in `out` (whose old contents are dropped);
    /// false, and the stream marked idle, when nothing waits.
    pub(crate) fn take(&mut self, out: &mut Vec<u8>) -> bool {
        out.clear();
        if self.queued.is_empty() {
            self.in_flight = false;
            if self.queued.capacity() > KEEP_OUTPUT {
                self.queued = Vec::new();
            }
            return false;
        }
        core::mem::swap(out, &mut self.queued);
        self.in_flight = true;
        true
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    #[test]
    fn a_read_is_handed_over_a_few_first_then_in_doubling_steps() {
        let mut sizes = Vec::new();
        let mut handed = 0;
        while handed < 64 {
            let n = RecvBuffers::hand_over(handed);
            sizes.push(n);
            handed += n;
        }
        assert_eq!(sizes, [8, 8, 16, 32]);
        assert_eq!(RecvBuffers::hand_over(0), RecvBuffers::HAND_OVER);
    }

    #[test]
    fn stream_output_joins_envelopes_in_order_up_to_its_bound() {
        let mut output = StreamOutput::default();
        let mut out = Vec::new();
        assert!(!output.take(&mut out), "nothing waits");
        assert!(output.push(&[1; 10], 25));
        assert!(output.push(&[2; 10], 25));
        assert!(!output.push(&[3; 10], 25), "30 octets would pass the bound");
        assert!(output.push(&[4; 5], 25));
        assert!(output.take(&mut out));
        assert!(output.in_flight());
        let want: Vec<u8> = [[1u8; 10].as_slice(), &[2; 10], &[4; 5]].concat();
        assert_eq!(out, want);
        assert!(output.is_empty());
        // The bound counts what waits, not what the runtime is writing.
        assert!(output.push(&[5; 25], 25));
        assert!(output.take(&mut out));
        assert_eq!(out, [5; 25]);
        assert!(!output.take(&mut out));
        assert!(
            !output.in_flight(),
            "asking again with nothing left marks it idle"
        );
    }

    #[allow(clippy::disallowed_methods)] // The base instant only anchors virtual time.
    fn t0() -> Instant {
        Instant::now()
    }

    /// A host whose transmits and events are scripted, in order.
    #[derive(Default)]
    struct Script {
        out: VecDeque<Result<(Transmit, Vec<u8>), &'static str>>,
        inputs: Vec<String>,
    }

    impl Host for Script {
        type Event = &'static str;

        fn handle_input(&mut self, _: Instant, input: Input<'_>) {
            self.inputs.push(format!("{input:?}"));
        }

        fn handle_timeout(&mut self, _: Instant) {}

        fn poll_transmit(&mut self, _: Instant, buf: &mut Vec<u8>) -> Option<Transmit> {
            match self.out.front()? {
                Ok(_) => {
                    let Some(Ok((t, bytes))) = self.out.pop_front() else {
                        return None;
                    };
                    *buf = bytes;
                    Some(t)
                }
                Err(_) => None,
            }
        }

        fn poll_event(&mut self) -> Option<&'static str> {
            match self.out.pop_front()? {
                Err(event) => Some(event),
                Ok(t) => {
                    self.out.push_front(Ok(t));
                    None
                }
            }
        }

        fn poll_timeout(&self) -> Option<Instant> {
            None
        }

        fn take_output(&mut self, _: Instant, _: StreamId, _: &mut Vec<u8>) -> bool {
            false
        }

        fn io_event(event: &'static str) -> Result<IoEvent, &'static str> {
            Err(event)
        }

        fn accept(&mut self, _: Instant, _: Transport, _: SocketAddr) -> Option<StreamId> {
            None
        }
    }

    /// A driver that records what it sends and acts on, joining up to `max` datagrams.
    struct Record {
        max: usize,
        log: Vec<String>,
        fail: bool,
    }

    impl Driver<Script> for Record {
        fn send(&mut self, t: Transmit, bytes: &[u8], segment: usize) -> Sent {
            let to = match t {
                Transmit::Datagram { to, .. } => to.port(),
                _ => 0,
            };
            let lens: Vec<usize> = bytes.chunks(segment.max(1)).map(<[u8]>::len).collect();
            self.log.push(format!("send {to} {lens:?}"));
            if self.fail {
                Sent::Failed
            } else {
                Sent::Done
            }
        }

        fn max_segments(&self, _: &Transmit) -> usize {
            self.max
        }

        fn connect(&mut self, _: Connect) -> Result<(), String> {
            Err("no streams here".into())
        }

        fn stream_ready(&mut self, _: StreamId) {}

        fn close_stream(&mut self, _: StreamId, _: bool, _: CloseReason) {}

        fn bind_socket(&mut self, _: SocketId, _: SocketAddr) -> io::Result<SocketAddr> {
            Err(io::ErrorKind::Unsupported.into())
        }

        fn close_socket(&mut self, _: SocketId) {}

        fn on_event(&mut self, _: &mut Script, _: Instant, event: &'static str) {
            self.log.push(format!("act {event}"));
        }
    }

    fn datagram(port: u16, len: usize) -> Result<(Transmit, Vec<u8>), &'static str> {
        let to = SocketAddr::from(([127, 0, 0, 1], port));
        Ok((
            Transmit::Datagram {
                socket: SocketId(0),
                to,
            },
            vec![port as u8; len],
        ))
    }

    fn run(max: usize, out: Vec<Result<(Transmit, Vec<u8>), &'static str>>) -> Vec<String> {
        let mut host = Script {
            out: out.into(),
            ..Script::default()
        };
        let mut driver = Record {
            max,
            log: Vec::new(),
            fail: false,
        };
        drain(&mut host, &mut driver, t0(), &mut Batch::default());
        driver.log
    }

    #[test]
    fn drain_joins_datagrams_to_one_destination_of_one_size() {
        let log = run(
            4,
            vec![
                datagram(1, 10),
                datagram(1, 10),
                datagram(1, 10),
                // A shorter one ends the batch it joins.
                datagram(1, 4),
                datagram(1, 10),
                // Another destination starts a new batch, and so does a longer datagram.
                datagram(2, 10),
                datagram(2, 20),
                // At most four join.
                datagram(3, 5),
                datagram(3, 5),
                datagram(3, 5),
                datagram(3, 5),
                datagram(3, 5),
            ],
        );
        assert_eq!(
            log,
            [
                "send 1 [10, 10, 10, 4]",
                "send 1 [10]",
                "send 2 [10]",
                "send 2 [20]",
                "send 3 [5, 5, 5, 5]",
                "send 3 [5]",
            ]
        );
    }

    #[test]
    fn drain_sends_what_was_polled_before_an_event_first_and_one_at_a_time_without_gso() {
        let out = vec![
            datagram(1, 10),
            datagram(1, 10),
            Err("close"),
            datagram(1, 10),
        ];
        assert_eq!(
            run(8, out.clone()),
            ["send 1 [10, 10]", "act close", "send 1 [10]"]
        );
        assert_eq!(
            run(1, out),
            ["send 1 [10]", "send 1 [10]", "act close", "send 1 [10]"]
        );
    }

    #[test]
    fn a_failed_batch_is_reported_once_and_the_next_one_still_goes() {
        let mut host = Script {
            out: vec![datagram(1, 10), datagram(1, 10), datagram(2, 10)].into(),
            ..Script::default()
        };
        let mut driver = Record {
            max: 8,
            log: Vec::new(),
            fail: true,
        };
        drain(&mut host, &mut driver, t0(), &mut Batch::default());
        assert_eq!(driver.log, ["send 1 [10, 10]", "send 2 [10]"]);
        assert_eq!(host.inputs, ["SendFailed", "SendFailed"]);
    }

    #[test]
    fn no_batch_passes_the_largest_udp_payload() {
        let out = (0..8).map(|_| datagram(1, 20_000)).collect();
        assert_eq!(
            run(64, out),
            [
                "send 1 [20000, 20000, 20000]",
                "send 1 [20000, 20000, 20000]",
                "send 1 [20000, 20000]"
            ]
        );
    }

    #[test]
    fn recv_buffers_grow_when_reads_keep_filling_them_and_split_what_gro_joined() {
        let mut bufs = RecvBuffers::new();
        assert_eq!(bufs.slots(), 1);
        assert_eq!(bufs.slices()[0].len(), RecvBuffers::SLOT);
        assert!(bufs.slices()[1..].iter().all(|s| s.is_empty()));
        // A few full reads, as a tunnel that only connects makes, keep one slot.
        for _ in 1..RecvBuffers::GROW_AFTER {
            bufs.filled(1);
        }
        assert_eq!(bufs.slots(), 1);
        bufs.filled(1);
        assert_eq!(bufs.slots(), 2);
        // A read that leaves a slot empty starts the count again.
        for _ in 1..RecvBuffers::GROW_AFTER {
            bufs.filled(2);
        }
        bufs.filled(1);
        bufs.filled(2);
        assert_eq!(bufs.slots(), 2);
        for _ in 0..100 {
            let slots = bufs.slots();
            bufs.filled(slots);
        }
        assert_eq!(bufs.slots(), RecvBuffers::MAX_SLOTS);
        {
            let mut slices = bufs.slices();
            slices[1][..25].copy_from_slice(&[7; 25]);
        }
        let lens: Vec<usize> = bufs.datagrams(1, 25, 10).map(<[u8]>::len).collect();
        assert_eq!(lens, [10, 10, 5]);
        assert!(bufs.datagrams(1, 25, 10).all(|d| d.iter().all(|&b| b == 7)));
        // A length past the slot is cut at the slot's end.
        assert_eq!(bufs.datagrams(0, usize::MAX, usize::MAX).count(), 1);
    }
}
