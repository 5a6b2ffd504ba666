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
use std::io::IoSliceMut;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

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
    /// A [`Transmit::QuicDatagram`] did not fit in a QUIC datagram and went on the stream
    /// instead (counted).
    QuicFallback {
        /// The stream.
        stream: StreamId,
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

/// How a stream the host asks for is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls(Verify),
    /// A QUIC connection (ALPN `tscf`) and the one stream the client opens.
    Quic(Verify),
}

impl Security {
    /// The transport this security stands for.
    pub fn transport(self) -> Transport {
        match self {
            Self::Tcp => Transport::TCP,
            Self::Tls(_) => Transport::TLS,
            Self::Quic(_) => Transport::QUIC,
        }
    }
}

/// How the runtime checks the certificate of a stream it connects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verify {
    /// As the tunnel's TLS settings say (a CA file and name, a pinned fingerprint): the
    /// transport to a server.
    Server,
    /// Exactly the certificate whose SHA-256 is this: a peer stream, pinned through the
    /// director.
    Pinned([u8; 32]),
}

/// What a host asks of the runtime's sockets and streams. Carried by each host's event type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoEvent {
    /// Connect a stream as [`Connect`] says, within the host's transport timeout, then report
    /// [`Input::StreamOpen`] or [`Input::StreamClosed`].
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

/// A stream the host asks the runtime to connect ([`IoEvent::Connect`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Connect {
    /// The new stream's id.
    pub stream: StreamId,
    /// Where to.
    pub to: SocketAddr,
    /// How to secure it.
    pub security: Security,
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
    /// large now, the runtime writes it on the stream instead and reports
    /// [`Input::QuicFallback`].
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
    /// The socket and stream work among the host's events, if `event` is such.
    fn io_event(event: &Self::Event) -> Option<IoEvent>;
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
    /// Sends the bytes of one transmit; what to report to the host about it, if anything
    /// ([`Input::SendFailed`] when the socket refused them, [`Input::QuicFallback`]).
    ///
    /// For a [`Transmit::Datagram`], `bytes` may hold several datagrams to the same
    /// destination, back to back: each `segment` octets long but the last, which may be
    /// shorter (what UDP GSO sends in one system call). There are never more than
    /// [`max_segments`](Self::max_segments) of them; for any other transmit `segment` is the
    /// length of `bytes`.
    fn send(&mut self, transmit: Transmit, bytes: &[u8], segment: usize) -> Option<Input<'static>>;
    /// How many datagrams of one [`Transmit::Datagram`] the driver sends in one call, at
    /// most: 1 (the default) when it sends each on its own.
    fn max_segments(&self, transmit: &Transmit) -> usize {
        let _ = transmit;
        1
    }
    /// Acts on one event. The host is lent back for the inputs an event causes at once (a
    /// socket bound, a connection that failed to start).
    fn act(&mut self, host: &mut H, now: Instant, event: H::Event);
}

/// The largest UDP payload over IPv4, and so the most one send of joined datagrams carries.
const MAX_BATCH_OCTETS: usize = 65_507;

/// The drain's buffers: the datagrams joined for one send, and the transmit polled after them
/// that could not join them (it starts the next send). Kept between drains, so that sending
/// allocates nothing.
#[derive(Debug, Default)]
pub struct Batch {
    buf: Vec<u8>,
    next: Vec<u8>,
    pending: Option<Transmit>,
}

impl Batch {
    /// Polls the host's next transmit into the buffer and joins the datagrams that follow it
    /// to the same socket and destination, as many as `driver` sends at once, while they are
    /// as long as the first (the last of them may be shorter). Returns the transmit and the
    /// segment length; the bytes are in [`bytes`](Self::bytes).
    pub fn poll<H: Host>(
        &mut self,
        host: &mut H,
        driver: &impl Driver<H>,
        now: Instant,
    ) -> Option<(Transmit, usize)> {
        let first = match self.pending.take() {
            Some(pending) => {
                core::mem::swap(&mut self.buf, &mut self.next);
                pending
            }
            None => host.poll_transmit(now, &mut self.buf)?,
        };
        let segment = self.buf.len();
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
            self.buf.extend_from_slice(&self.next);
            if self.next.len() < segment {
                break;
            }
        }
        Some((first, segment))
    }

    /// The bytes of the transmit [`poll`](Self::poll) returned last.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }
}

/// The drain every runtime runs after an input at `now`: the host's transmits are sent, then
/// one event is acted on, until the host has neither left. What the driver says of a send is
/// reported to the host. Consecutive datagrams to one destination go out together
/// ([`Batch::poll`]); every transmit polled before an event is sent before it is acted on.
pub fn drain<H: Host>(host: &mut H, driver: &mut impl Driver<H>, now: Instant, batch: &mut Batch) {
    loop {
        while let Some((transmit, segment)) = batch.poll(host, driver, now) {
            if let Some(report) = driver.send(transmit, batch.bytes(), segment) {
                host.handle_input(now, report);
            }
        }
        match host.poll_event() {
            Some(event) => driver.act(host, now, event),
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
    /// Octets of one slot: the largest UDP datagram, or what GRO joins at most.
    pub const SLOT: usize = 64 * 1024;
    /// Slots at most: what one `recvmmsg` reads.
    pub const MAX_SLOTS: usize = 32;
    /// Reads in a row that fill every slot before the slots double.
    pub const GROW_AFTER: u32 = 8;

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

        fn io_event(_: &&'static str) -> Option<IoEvent> {
            None
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
        fn send(&mut self, t: Transmit, bytes: &[u8], segment: usize) -> Option<Input<'static>> {
            let to = match t {
                Transmit::Datagram { to, .. } => to.port(),
                _ => 0,
            };
            let lens: Vec<usize> = bytes.chunks(segment.max(1)).map(<[u8]>::len).collect();
            self.log.push(format!("send {to} {lens:?}"));
            self.fail.then_some(Input::SendFailed)
        }

        fn max_segments(&self, _: &Transmit) -> usize {
            self.max
        }

        fn act(&mut self, _: &mut Script, _: Instant, event: &'static str) {
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
