//! Reliable, ordered byte streams (a deliberately simple TCP model).
//!
//! A stream is a connection between two ends: the connector (side 0, the handle returned by
//! [`Network::connect_stream`]) and the acceptor (side 1, the handle in
//! [`NetEvent::StreamAccepted`]). Segments are never lost or reordered; each takes the path's
//! latency plus jitter and never overtakes an earlier one in the same direction. The route is
//! fixed at connect time; cutting it (a link down or a block rule) resets the stream at once.
//! Closing is a full close: the closing end neither sends nor receives any more, and the peer
//! gets [`NetEvent::StreamClosed`] after the data sent before it.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use super::{Delivery, Event, HostId, LinkId, NetEvent, Network, PublicOwner, SiteId};

/// Handle of one end of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamId(u64);

impl StreamId {
    fn new(conn: usize, side: usize) -> Self {
        Self(((conn as u64) << 1) | side as u64)
    }

    fn conn(self) -> usize {
        usize::try_from(self.0 >> 1).unwrap_or(usize::MAX)
    }

    fn side(self) -> usize {
        (self.0 & 1) as usize
    }
}

/// Why a stream operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// No such stream end.
    #[error("unknown stream")]
    Unknown,
    /// This end or the peer closed the stream.
    #[error("stream closed")]
    Closed,
    /// The stream was refused or reset.
    #[error("stream reset")]
    Reset,
}

/// A stream segment in flight towards side `to` of connection `conn`.
#[derive(Debug)]
pub(super) struct Segment {
    conn: usize,
    to: usize,
    kind: SegmentKind,
}

#[derive(Debug)]
enum SegmentKind {
    Syn,
    SynAck,
    Data(Vec<u8>),
    Fin,
    Rst,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Open,
    Dead,
}

#[derive(Debug)]
struct End {
    host: HostId,
    local: SocketAddr,
    remote: SocketAddr,
    closed: bool,
    /// Set when the peer's close was delivered; sending fails from then on.
    peer_closed: bool,
    reset_delivered: bool,
    /// Exit time of the latest segment sent by this end, for in-order delivery.
    last_exit: Instant,
}

#[derive(Debug)]
struct Conn {
    ends: [End; 2],
    /// Links from the connector to the acceptor; the reverse direction uses the same links.
    path: Vec<LinkId>,
    /// Address pairs the connection shows at its two ends, checked against block rules.
    pairs: [(IpAddr, IpAddr); 2],
    state: State,
    /// Public port held on the connector's NAT.
    nat_port: Option<(SiteId, u16)>,
}

/// All streams and listeners of a network.
#[derive(Debug, Default)]
pub(super) struct Streams {
    /// Connections by index; kept for the whole run so that handles stay valid.
    conns: Vec<Conn>,
    listeners: BTreeSet<SocketAddr>,
}

/// Route of a new connection.
struct Route {
    path: Vec<LinkId>,
    dst: HostId,
    nat_site: Option<SiteId>,
}

impl Network {
    /// Accepts streams to `addr` from now on.
    ///
    /// # Panics
    ///
    /// If no host owns `addr`'s IP.
    pub fn listen_stream(&mut self, addr: SocketAddr) {
        assert!(
            self.host_by_ip(addr.ip()).is_some(),
            "sim: listen_stream on {addr}, which no host owns"
        );
        self.streams.listeners.insert(addr);
    }

    /// Stops accepting streams to `addr`; established streams are unaffected.
    pub fn unlisten_stream(&mut self, addr: SocketAddr) {
        self.streams.listeners.remove(&addr);
    }

    /// Opens a stream from `from` (an address of the connecting host) to `to`. The result comes
    /// later as [`NetEvent::StreamConnected`] or [`NetEvent::StreamReset`]; data may be sent
    /// right away and is delivered after the acceptance.
    ///
    /// # Panics
    ///
    /// If no host owns `from`'s IP.
    pub fn connect_stream(&mut self, from: SocketAddr, to: SocketAddr) -> StreamId {
        let Some(a) = self.host_by_ip(from.ip()) else {
            panic!("sim: connect_stream from {from}, which no host owns");
        };
        self.stats.streams_opened += 1;
        let conn = self.streams.conns.len();
        let id = StreamId::new(conn, 0);
        let route = self.stream_route(a, to.ip());
        let (path, dst, mut seen_from, nat_site) = match route {
            Some(r) => (r.path, r.dst, from, r.nat_site),
            // Side 1 of a refused stream is never used; the connector stands in for it.
            None => (Vec::new(), a, from, None),
        };
        let mut nat_port = None;
        if let Some(s) = nat_site {
            let now = self.now;
            let site = &mut self.sites[s.0 as usize];
            if let Some(nat) = &mut site.nat {
                if let Some(p) = nat.allocate_stream_port(from.port(), now, &mut self.rng) {
                    seen_from = SocketAddr::new(nat.cfg.public_ip, p);
                    nat_port = Some((s, p));
                }
            }
        }
        let now = self.now;
        let end = |host, local, remote| End {
            host,
            local,
            remote,
            closed: false,
            peer_closed: false,
            reset_delivered: false,
            last_exit: now,
        };
        let refused = route_refused(&path, nat_site, nat_port);
        self.streams.conns.push(Conn {
            ends: [end(a, from, to), end(dst, to, seen_from)],
            path,
            pairs: [(from.ip(), to.ip()), (seen_from.ip(), to.ip())],
            state: State::Connecting,
            nat_port,
        });
        if refused || !self.path_ok(conn) {
            self.stats.streams_refused += 1;
            self.finish(conn);
            self.schedule(
                self.now,
                Event::Stream(Segment {
                    conn,
                    to: 0,
                    kind: SegmentKind::Rst,
                }),
            );
        } else {
            self.send_segment(conn, 0, SegmentKind::Syn);
        }
        id
    }

    /// Sends `data` on stream end `id`; it arrives as one [`NetEvent::StreamData`].
    pub fn stream_send(&mut self, id: StreamId, data: &[u8]) -> Result<(), StreamError> {
        let (conn, side) = self.stream_end(id)?;
        let c = &self.streams.conns[conn];
        let end = &c.ends[side];
        if end.closed {
            return Err(StreamError::Closed);
        }
        if c.state == State::Dead {
            return Err(StreamError::Reset);
        }
        if end.peer_closed {
            return Err(StreamError::Closed);
        }
        if !data.is_empty() {
            self.send_segment(conn, side, SegmentKind::Data(data.to_vec()));
        }
        Ok(())
    }

    /// Closes stream end `id`; the peer gets [`NetEvent::StreamClosed`] after pending data.
    /// Closing twice is a no-op.
    pub fn close_stream(&mut self, id: StreamId) -> Result<(), StreamError> {
        let (conn, side) = self.stream_end(id)?;
        let c = &mut self.streams.conns[conn];
        if c.ends[side].closed {
            return Ok(());
        }
        c.ends[side].closed = true;
        if c.state == State::Dead {
            return Ok(());
        }
        if c.ends[1 - side].closed {
            self.finish(conn);
        } else {
            self.send_segment(conn, side, SegmentKind::Fin);
        }
        Ok(())
    }

    fn stream_end(&self, id: StreamId) -> Result<(usize, usize), StreamError> {
        let (conn, side) = (id.conn(), id.side());
        match self.streams.conns.get(conn) {
            // The acceptor's handle exists only once the acceptance was delivered.
            Some(c) if side == 0 || c.state != State::Connecting => Ok((conn, side)),
            _ => Err(StreamError::Unknown),
        }
    }

    fn stream_route(&self, a: HostId, to: IpAddr) -> Option<Route> {
        let a_site = self.host(a).site;
        if let Some(b) = self.host_by_ip(to) {
            if a_site.is_some() && self.host(b).site == a_site {
                return Some(Route {
                    path: vec![LinkId::Access(a), LinkId::Access(b)],
                    dst: b,
                    nat_site: None,
                });
            }
        }
        let mut path = vec![LinkId::Access(a)];
        let mut nat_site = None;
        if let Some(s) = a_site {
            path.push(LinkId::Uplink(s));
            if self.sites[s.0 as usize].nat.is_some() {
                nat_site = Some(s);
            }
        }
        let dst = match self.public.get(&to).copied()? {
            PublicOwner::Host(b) => b,
            // Streams never enter through a NAT (no port forwarding, no hairpinning).
            PublicOwner::Site(s) if self.sites[s.0 as usize].nat.is_some() => return None,
            PublicOwner::Site(s) => {
                path.push(LinkId::Uplink(s));
                self.host_by_ip(to)?
            }
        };
        path.push(LinkId::Access(dst));
        Some(Route {
            path,
            dst,
            nat_site,
        })
    }

    fn path_ok(&self, conn: usize) -> bool {
        let c = &self.streams.conns[conn];
        c.path.iter().all(|&l| self.link_config(l).up)
            && c.pairs.iter().all(|&(x, y)| !self.is_blocked(x, y))
    }

    /// Marks a connection dead and returns its NAT port.
    fn finish(&mut self, conn: usize) {
        let c = &mut self.streams.conns[conn];
        c.state = State::Dead;
        if let Some((s, p)) = c.nat_port.take() {
            if let Some(nat) = &mut self.sites[s.0 as usize].nat {
                nat.release_stream_port(p);
            }
        }
    }

    /// Resets every live stream whose path is now cut.
    pub(super) fn cut_streams(&mut self) {
        for conn in 0..self.streams.conns.len() {
            let state = self.streams.conns[conn].state;
            if state == State::Dead || self.path_ok(conn) {
                continue;
            }
            self.stats.streams_reset += 1;
            self.finish(conn);
            // The acceptor only knows about the stream once it is open.
            let sides: &[usize] = if state == State::Open { &[0, 1] } else { &[0] };
            for &to in sides {
                let seg = Segment {
                    conn,
                    to,
                    kind: SegmentKind::Rst,
                };
                self.schedule(self.now, Event::Stream(seg));
            }
        }
    }

    /// Schedules a segment from side `from` after the path delay, behind earlier segments.
    fn send_segment(&mut self, conn: usize, from: usize, kind: SegmentKind) {
        let c = &self.streams.conns[conn];
        let mut at = self.now;
        for &link in &c.path {
            let l = match link {
                LinkId::Access(h) => &self.hosts[h.0 as usize].access,
                LinkId::Uplink(s) => &self.sites[s.0 as usize].uplink,
            };
            at += l.delay(&mut self.rng);
        }
        let end = &mut self.streams.conns[conn].ends[from];
        at = at.max(end.last_exit);
        end.last_exit = at;
        let seg = Segment {
            conn,
            to: 1 - from,
            kind,
        };
        self.schedule(at, Event::Stream(seg));
    }

    pub(super) fn on_segment(&mut self, seg: Segment) -> Option<Delivery> {
        let Segment { conn, to, kind } = seg;
        let stream = StreamId::new(conn, to);
        let c = &mut self.streams.conns[conn];
        let state = c.state;
        let end = &mut c.ends[to];
        let host = end.host;
        let event = match kind {
            SegmentKind::Rst => {
                if end.closed || end.reset_delivered {
                    return None;
                }
                end.reset_delivered = true;
                NetEvent::StreamReset { stream }
            }
            _ if state == State::Dead || end.closed => return None,
            SegmentKind::Syn => {
                let (local, remote) = (end.local, end.remote);
                if self.streams.listeners.contains(&local) {
                    self.streams.conns[conn].state = State::Open;
                    self.send_segment(conn, to, SegmentKind::SynAck);
                    NetEvent::StreamAccepted {
                        stream,
                        local,
                        remote,
                    }
                } else {
                    self.stats.streams_refused += 1;
                    self.finish(conn);
                    self.send_segment(conn, to, SegmentKind::Rst);
                    return None;
                }
            }
            SegmentKind::SynAck => NetEvent::StreamConnected {
                stream,
                local: end.local,
                remote: end.remote,
            },
            SegmentKind::Data(data) => NetEvent::StreamData { stream, data },
            SegmentKind::Fin => {
                end.peer_closed = true;
                NetEvent::StreamClosed { stream }
            }
        };
        Some(Delivery {
            at: self.now,
            host,
            event,
        })
    }
}

/// Whether a connection must be refused: no route, or its NAT had no port for it.
fn route_refused(
    path: &[LinkId],
    nat_site: Option<SiteId>,
    nat_port: Option<(SiteId, u16)>,
) -> bool {
    path.is_empty() || (nat_site.is_some() && nat_port.is_none())
}
