//! The director's mesh links (`docs/PROTOCOL.md` §9, `docs/CLUSTER.md`): links to the other
//! directors of its cluster, the routes that say which director holds an address, relaying
//! inner packets across, and peer introductions between clients of two directors, with the
//! release notices that follow when one of them closes its tunnel.
//!
//! A mesh link is trusted to be a director of the cluster (the runtime authenticated it), not
//! to be right: what it relays must be for a local tunnel, from an address of the pools that
//! no local tunnel holds, and every message must decode; anything else is dropped and counted.

use core::net::{IpAddr, SocketAddr};
use std::cmp::Reverse;
use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use rustc_hash::{FxHashMap, FxHashSet};

mod peer_gone;

use super::peer::MAX_PEERS_PER_TUNNEL;
use super::{ConnectionHandle, DirectorEvent, DuplicateConnection, SessionDirector, Timer};
use crate::cluster::{DirectorName, MeshMessage, RegistryResponse, MAX_PEER_GONE_PARTNERS};
use crate::wire::{
    Capabilities, Envelope, EnvelopeType, Header, InnerPacket, Message, MessageType,
    PeerCredentials, PeerServiceResult, ResultCode, ServiceAction, ServiceType,
};

/// Routes remembered, at most; beyond, expired ones are forgotten, and if none has expired,
/// all.
const MAX_ROUTES: usize = 65_536;
/// Route lookups in flight, at most.
const MAX_LOOKUPS: usize = 1024;
/// Peer requests waiting for another director's answer, on either side, at most.
const MAX_REMOTE_PEER: usize = 4096;

// One Peer Gone names every partner one tunnel has behind one director.
const _: () = assert!(MAX_PEERS_PER_TUNNEL <= MAX_PEER_GONE_PARTNERS);

/// The mesh state of a director in a cluster.
#[derive(Debug, Default)]
pub(super) struct Mesh {
    /// The links by the other director's name.
    links: BTreeMap<DirectorName, Link>,
    /// Every mesh connection, with its director's name once known (a link accepted from
    /// another director is named by its Hello).
    by_connection: FxHashMap<ConnectionHandle, Option<DirectorName>>,
    /// Which director holds an address (`None`: nobody, as far as the registry knew).
    routes: FxHashMap<IpAddr, Route>,
    /// Addresses being looked up.
    lookups: FxHashSet<IpAddr>,
    /// When each director was last dialed.
    dialed: FxHashMap<DirectorName, Instant>,
    /// Frames queued for mesh links, in order, with their connection.
    out: VecDeque<(ConnectionHandle, Vec<u8>)>,
    queued: usize,
    next_exchange: u32,
    /// Initiator side: peer requests sent to another director, by exchange.
    asked: FxHashMap<u32, Asked>,
    /// Destination side: peer requests forwarded to a local client for another director,
    /// by the forwarded request's sequence number.
    forwarded: FxHashMap<u32, Forwarded>,
    /// For each local tunnel, the clients of other directors it was introduced to (as
    /// initiator or destination), at most [`MAX_PEERS_PER_TUNNEL`], the oldest forgotten
    /// beyond. Only tunnels held here have an entry.
    introduced: FxHashMap<u64, Vec<RemotePeer>>,
}

/// A client of another director that a local tunnel was introduced to.
#[derive(Debug)]
struct RemotePeer {
    /// Its internal address, as the introduction named it.
    addr: IpAddr,
    /// The director that held it then.
    via: DirectorName,
}

#[derive(Debug)]
struct Link {
    connection: ConnectionHandle,
    /// Frames in [`Mesh::out`] for it.
    queued: usize,
}

#[derive(Clone, Debug)]
struct Route {
    via: Option<DirectorName>,
    until: Instant,
}

#[derive(Debug)]
struct Asked {
    initiator: u64,
    request: Header,
    peer: IpAddr,
    token: [u8; 16],
    /// The director asked; `None` while the registry is asked who holds `peer`.
    via: Option<DirectorName>,
    /// The request to send once `via` is known (empty once sent).
    unsent: Vec<u8>,
}

#[derive(Debug)]
struct Forwarded {
    via: DirectorName,
    exchange: u32,
    destination: u64,
    /// The initiator's address, as the request names it.
    initiator: IpAddr,
    bytes: Vec<u8>,
    sent: u32,
    deadline: Instant,
}

impl Mesh {
    /// The next queued mesh frame.
    pub(super) fn pop(&mut self) -> Option<(ConnectionHandle, Vec<u8>)> {
        let (connection, frame) = self.out.pop_front()?;
        self.queued -= 1;
        if let Some(Some(name)) = self.by_connection.get(&connection) {
            if let Some(link) = self.links.get_mut(name) {
                link.queued = link.queued.saturating_sub(1);
            }
        }
        Some((connection, frame))
    }

    fn is_link(&self, connection: ConnectionHandle) -> bool {
        self.by_connection.contains_key(&connection)
    }

    fn route(&self, now: Instant, addr: IpAddr) -> Option<Option<&DirectorName>> {
        self.routes
            .get(&addr)
            .filter(|r| r.until > now)
            .map(|r| r.via.as_ref())
    }

    fn learn(&mut self, now: Instant, addr: IpAddr, via: Option<DirectorName>, ttl: Instant) {
        if self.routes.len() >= MAX_ROUTES && !self.routes.contains_key(&addr) {
            self.routes.retain(|_, r| r.until > now);
            if self.routes.len() >= MAX_ROUTES {
                self.routes.clear();
            }
        }
        self.routes.insert(addr, Route { via, until: ttl });
    }

    fn forget_via(&mut self, name: &DirectorName) {
        self.routes.retain(|_, r| r.via.as_ref() != Some(name));
    }
}

impl SessionDirector {
    /// A mesh link to another director of the cluster came up: a stream the runtime
    /// connected to (the director it dialed after [`DirectorEvent::DialMesh`], `peer` its
    /// name) or accepted on its mesh listener (`peer` `None` unless the runtime knows the
    /// name from the client certificate; the link is then named by its first message, a
    /// Hello). Either way the director sends its own Hello first (`docs/PROTOCOL.md` §9).
    /// A link to a director that already has one replaces it. Outside a cluster the
    /// connection is closed at once.
    pub fn handle_mesh_connect(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        peer: Option<DirectorName>,
    ) -> Result<(), DuplicateConnection> {
        // Nothing is timed at connect; `now` keeps the shape of every input.
        let _ = now;
        let known = self.connections.contains_key(&connection);
        let Some(c) = self.cluster.as_deref_mut() else {
            self.events
                .push_back(DirectorEvent::CloseConnection { connection });
            return Ok(());
        };
        if known || c.mesh.is_link(connection) {
            return Err(DuplicateConnection(connection));
        }
        c.mesh.by_connection.insert(connection, None);
        let hello = MeshMessage::Hello(c.name().clone());
        self.send_mesh(connection, &hello);
        if let Some(name) = peer {
            self.name_link(connection, name);
        }
        Ok(())
    }

    /// Whether `connection` is a mesh link.
    pub(super) fn is_mesh(&self, connection: ConnectionHandle) -> bool {
        self.cluster
            .as_deref()
            .is_some_and(|c| c.mesh.is_link(connection))
    }

    /// Names mesh connection `connection` as the link to `name`.
    fn name_link(&mut self, connection: ConnectionHandle, name: DirectorName) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let mesh = &mut c.mesh;
        match mesh.by_connection.get(&connection) {
            Some(Some(known)) if *known == name => return,
            Some(None) if name != c.config.name => {}
            // Renamed, or named as this director: not a link to trust.
            _ => {
                self.stats.cluster.mesh_dropped.bad_message += 1;
                return self.drop_mesh(connection);
            }
        }
        mesh.by_connection.insert(connection, Some(name.clone()));
        let link = Link {
            connection,
            queued: 0,
        };
        if let Some(old) = mesh.links.insert(name, link) {
            // The newer link wins; frames queued on the old one still go out on it.
            mesh.by_connection.remove(&old.connection);
            self.events.push_back(DirectorEvent::CloseConnection {
                connection: old.connection,
            });
        }
        self.stats.cluster.mesh_links += 1;
    }

    /// A mesh link closed (`handle_disconnect`): routes through it go.
    pub(super) fn mesh_disconnected(&mut self, connection: ConnectionHandle) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let mesh = &mut c.mesh;
        let Some(name) = mesh.by_connection.remove(&connection).flatten() else {
            return;
        };
        if mesh
            .links
            .get(&name)
            .is_some_and(|l| l.connection == connection)
        {
            mesh.links.remove(&name);
            mesh.forget_via(&name);
        }
    }

    /// Forgets mesh link `connection` and tells the runtime to close it.
    fn drop_mesh(&mut self, connection: ConnectionHandle) {
        self.mesh_disconnected(connection);
        self.events
            .push_back(DirectorEvent::CloseConnection { connection });
    }

    /// The directors alive changed (a heartbeat's answer): links to dial, routes through the
    /// dead to forget.
    pub(super) fn members_changed(
        &mut self,
        now: Instant,
        members: Vec<(DirectorName, SocketAddr)>,
    ) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let heartbeat = c.config.heartbeat;
        for (dead, _) in &c.members {
            if !members.iter().any(|(n, _)| n == dead) {
                c.mesh.forget_via(dead);
                c.mesh.dialed.remove(dead);
            }
        }
        for (name, addr) in &members {
            // Of each pair, the director whose name sorts lower dials (one link a pair).
            if *name <= c.config.name || c.mesh.links.contains_key(name) {
                continue;
            }
            let due = c
                .mesh
                .dialed
                .get(name)
                .is_none_or(|at| now.saturating_duration_since(*at) * 2 >= heartbeat);
            if due {
                c.mesh.dialed.insert(name.clone(), now);
                self.stats.cluster.mesh_dials += 1;
                self.events.push_back(DirectorEvent::DialMesh {
                    name: name.clone(),
                    addr: *addr,
                });
            }
        }
        c.members = members;
    }

    /// An envelope on mesh link `connection`.
    pub(super) fn handle_mesh_envelope(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        envelope: Envelope<'_>,
    ) {
        self.stats.cluster.mesh_frames_in += 1;
        let name = self
            .cluster
            .as_deref()
            .and_then(|c| c.mesh.by_connection.get(&connection).cloned().flatten());
        if envelope.kind == EnvelopeType::MESH {
            let Ok(message) = MeshMessage::decode(envelope.payload) else {
                self.stats.cluster.mesh_dropped.bad_message += 1;
                return;
            };
            if let MeshMessage::Hello(peer) = message {
                return self.name_link(connection, peer);
            }
            let Some(name) = name else {
                self.stats.cluster.mesh_dropped.bad_message += 1;
                return;
            };
            return self.handle_mesh_message(now, connection, name, message);
        }
        match (envelope.kind, name) {
            (EnvelopeType::DATA, Some(name)) => {
                self.relay_from_mesh(now, connection, name, envelope.payload);
            }
            _ => self.stats.cluster.mesh_dropped.bad_message += 1,
        }
    }

    fn handle_mesh_message(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        name: DirectorName,
        message: MeshMessage<'_>,
    ) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let ttl = now + c.config.route_ttl;
        match message {
            MeshMessage::Hello(_) => {}
            MeshMessage::NotHere(addr) => {
                // Not there: nobody, until the registry is asked again.
                if c.mesh.route(now, addr).flatten() == Some(&name) {
                    c.mesh.learn(now, addr, None, ttl);
                }
            }
            MeshMessage::Adopted { id, addresses } => {
                for addr in &addresses {
                    c.mesh.learn(now, *addr, Some(name.clone()), ttl);
                }
                let ours = self
                    .tunnels
                    .get(&id)
                    .is_some_and(|t| addresses.iter().all(|a| t.owns(*a)));
                if ours {
                    self.moved_away(id, name);
                }
            }
            MeshMessage::PeerRequest {
                exchange,
                destination,
                request,
            } => self.peer_request_from_mesh(now, connection, name, exchange, destination, request),
            MeshMessage::PeerAnswer { exchange, response } => {
                self.peer_answer_from_mesh(name, exchange, response);
            }
            MeshMessage::PeerGone { departed, partners } => {
                self.peer_gone_from_mesh(now, &name, departed, &partners);
            }
        }
    }

    /// Queues `message` on mesh link `connection`, before the frames queued for it.
    fn send_mesh(&mut self, connection: ConnectionHandle, message: &MeshMessage<'_>) {
        let mut bytes = Vec::new();
        if message.encode_envelope(&mut bytes).is_ok() {
            self.control_out.push_back((connection, bytes));
        }
    }

    /// Tells every mesh link that this director now holds tunnel `id` at `addresses`.
    pub(super) fn announce_adoption(&mut self, id: u64, addresses: Vec<IpAddr>) {
        let Some(c) = self.cluster.as_deref() else {
            return;
        };
        let links: Vec<ConnectionHandle> = c.mesh.links.values().map(|l| l.connection).collect();
        let message = MeshMessage::Adopted { id, addresses };
        for connection in links {
            self.send_mesh(connection, &message);
        }
    }

    /// Another director adopted tunnel `id`: its client is there now. It is dropped here
    /// without a word to the client or the registry.
    pub(super) fn moved_away(&mut self, id: u64, by: DirectorName) {
        let Some(t) = self.tunnels.remove(&id) else {
            return;
        };
        for addr in t.addresses() {
            self.by_addr.remove(&addr);
        }
        match t.connection {
            Some(_) => self.queued_frames -= t.queue.len(),
            None => self.held_frames -= t.queue.len(),
        }
        if let Some(connection) = t.connection {
            if let Some(c) = self.connections.get_mut(&connection) {
                c.tunnel = None;
            }
            self.drop_connection(connection);
        }
        self.peer_forget(id);
        self.stats.cluster.moved_away += 1;
        self.events.push_back(DirectorEvent::TunnelMovedAway {
            tunnel_id: id,
            director: by,
        });
    }

    // ---- relaying ----

    /// A packet from a local tunnel for `destination`, which no local tunnel holds: sent to
    /// the director that holds it, once known.
    pub(super) fn relay_to_mesh(&mut self, now: Instant, destination: IpAddr, payload: &[u8]) {
        if !self.in_pools(destination) {
            self.stats.dropped.unknown_destination += 1;
            return;
        }
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let via = match c.mesh.route(now, destination) {
            Some(Some(via)) => via.clone(),
            Some(None) => {
                self.stats.dropped.unknown_destination += 1;
                return;
            }
            None => {
                self.stats.cluster.mesh_dropped.awaiting_route += 1;
                return self.look_up(destination);
            }
        };
        let Some(link) = c.mesh.links.get_mut(&via) else {
            self.stats.cluster.mesh_dropped.no_link += 1;
            return;
        };
        if link.queued >= self.config.max_queued_frames
            || c.mesh.queued >= self.config.max_total_queued_frames
        {
            self.stats.cluster.mesh_dropped.queue_full += 1;
            return;
        }
        let Ok(header) = Envelope::header_bytes(EnvelopeType::DATA, payload.len()) else {
            return;
        };
        let mut frame = self.spare.pop().unwrap_or_default();
        frame.clear();
        frame.extend_from_slice(&header);
        frame.extend_from_slice(payload);
        link.queued += 1;
        c.mesh.queued += 1;
        c.mesh.out.push_back((link.connection, frame));
        self.stats.cluster.mesh_frames_out += 1;
        self.stats.frames_relayed += 1;
        self.stats.bytes_relayed += payload.len() as u64;
    }

    /// Asks the registry who holds `addr`, unless it is being asked.
    fn look_up(&mut self, addr: IpAddr) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        if c.mesh.lookups.contains(&addr) || c.mesh.lookups.len() >= MAX_LOOKUPS {
            return;
        }
        if self.registry_lookup(addr) {
            if let Some(c) = self.cluster.as_deref_mut() {
                c.mesh.lookups.insert(addr);
            }
            self.stats.cluster.route_lookups += 1;
        }
    }

    /// The registry said who holds `addr`.
    pub(super) fn route_answer(&mut self, now: Instant, addr: IpAddr, response: RegistryResponse) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        c.mesh.lookups.remove(&addr);
        let via = match response {
            RegistryResponse::Address(Some(holder)) if holder.owner != c.config.name => {
                Some(holder.owner)
            }
            RegistryResponse::Address(_) => None,
            // Asked again at the next packet.
            _ => return,
        };
        let ttl = now + c.config.route_ttl;
        c.mesh.learn(now, addr, via.clone(), ttl);
        self.route_known(addr, via);
    }

    /// A Data envelope from the director at the other end of mesh link `connection`.
    fn relay_from_mesh(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        name: DirectorName,
        payload: &[u8],
    ) {
        if payload.len() > self.config.max_packet_len {
            self.stats.cluster.mesh_dropped.oversized += 1;
            return;
        }
        let Ok(packet) = InnerPacket::parse(payload) else {
            self.stats.cluster.mesh_dropped.bad_packet += 1;
            return;
        };
        let (source, destination) = (packet.source(), packet.destination());
        if self.by_addr.contains_key(&source) || !self.in_pools(source) {
            self.stats.cluster.mesh_dropped.spoofed_source += 1;
            return;
        }
        let Some(&id) = self.by_addr.get(&destination) else {
            self.stats.cluster.mesh_dropped.not_here += 1;
            return self.send_mesh(connection, &MeshMessage::NotHere(destination));
        };
        if let Some(c) = self.cluster.as_deref_mut() {
            // The way back, without a lookup.
            let ttl = now + c.config.route_ttl;
            c.mesh.learn(now, source, Some(name), ttl);
        }
        self.deliver(id, payload);
    }

    /// The next frame for a mesh link.
    pub(super) fn poll_mesh(&mut self) -> Option<(ConnectionHandle, Vec<u8>)> {
        self.cluster.as_deref_mut()?.mesh.pop()
    }

    // ---- peer introductions across directors ----

    /// A peer Establish of tunnel `id` for `peer`, an address no local tunnel holds: sent to
    /// the director that holds it, once the registry said which when no route was known. False
    /// when it cannot be (the address is known to be nobody's, no link goes to its director,
    /// or too many requests wait): the caller answers Peer Unavailable.
    pub(super) fn peer_request_to_mesh(
        &mut self,
        now: Instant,
        id: u64,
        header: Header,
        peer: IpAddr,
        forward: Message<'_>,
        token: [u8; 16],
    ) -> bool {
        let Some(c) = self.cluster.as_deref_mut() else {
            return false;
        };
        // Known to be nobody's: refused now. Unknown: it waits for the registry's answer
        // (see `route_answer`), within the answer timeout.
        let via = match c.mesh.route(now, peer) {
            Some(Some(via)) => Some(via.clone()),
            Some(None) => return false,
            None => None,
        };
        if via
            .as_ref()
            .is_some_and(|via| !c.mesh.links.contains_key(via))
            || c.mesh.asked.len() >= MAX_REMOTE_PEER
        {
            return false;
        }
        let mut bytes = Vec::new();
        if forward.encode(&mut bytes).is_err() {
            return false;
        }
        c.mesh.next_exchange = c.mesh.next_exchange.wrapping_add(1);
        let exchange = c.mesh.next_exchange;
        c.mesh.asked.insert(
            exchange,
            Asked {
                initiator: id,
                request: header,
                peer,
                token,
                via: None,
                unsent: bytes,
            },
        );
        let at = now + self.config.peer_answer_timeout;
        self.timers.push(Reverse((at, Timer::MeshPeer(exchange))));
        self.stats.peer.requests_forwarded += 1;
        match via {
            Some(via) => self.send_peer_request(exchange, via),
            None => self.look_up(peer),
        }
        true
    }

    /// Sends peer request `exchange` to director `via`, if a link to it is up; else the
    /// request is answered Peer Unavailable.
    fn send_peer_request(&mut self, exchange: u32, via: DirectorName) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let connection = c.mesh.links.get(&via).map(|l| l.connection);
        let Some(asked) = c.mesh.asked.get_mut(&exchange) else {
            return;
        };
        let Some(connection) = connection else {
            return self.peer_request_unavailable(exchange);
        };
        asked.via = Some(via);
        let bytes = std::mem::take(&mut asked.unsent);
        let message = MeshMessage::PeerRequest {
            exchange,
            destination: asked.peer,
            request: &bytes,
        };
        self.send_mesh(connection, &message);
        self.stats.cluster.peer_requests_relayed += 1;
    }

    /// Answers peer request `exchange` Peer Unavailable: no director holds its destination.
    fn peer_request_unavailable(&mut self, exchange: u32) {
        self.end_asked(exchange, ResultCode::PEER_UNAVAILABLE);
    }

    /// Ends peer request `exchange` unanswered by the other side, telling its initiator
    /// `result`. False if it was not waiting.
    fn end_asked(&mut self, exchange: u32, result: ResultCode) -> bool {
        let Some(asked) = self
            .cluster
            .as_deref_mut()
            .and_then(|c| c.mesh.asked.remove(&exchange))
        else {
            return false;
        };
        let mut reply = Message::response_to(&asked.request, result);
        reply.tlvs.service_type = Some(ServiceType::PEER);
        reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
        reply.tlvs.peer_internal_address = Some(asked.peer);
        self.answer_initiator(asked.initiator, &asked.request, &reply);
        true
    }

    /// The route to `addr` is known (`via`, or nobody): the peer requests that waited for it
    /// go, or are refused.
    fn route_known(&mut self, addr: IpAddr, via: Option<DirectorName>) {
        let Some(c) = self.cluster.as_deref() else {
            return;
        };
        let waiting: Vec<u32> = c
            .mesh
            .asked
            .iter()
            .filter(|(_, a)| a.via.is_none() && a.peer == addr)
            .map(|(exchange, _)| *exchange)
            .collect();
        for exchange in waiting {
            match &via {
                Some(via) => self.send_peer_request(exchange, via.clone()),
                None => self.peer_request_unavailable(exchange),
            }
        }
    }

    /// Whether tunnel `id`'s request `sequence` waits for another director's answer.
    pub(super) fn peer_request_asked(&self, id: u64, sequence: u32) -> bool {
        self.cluster.as_deref().is_some_and(|c| {
            c.mesh
                .asked
                .values()
                .any(|a| a.initiator == id && a.request.sequence == sequence)
        })
    }

    /// The answer timer of a peer request sent to another director.
    pub(super) fn mesh_peer_timer(&mut self, exchange: u32) {
        if self.end_asked(exchange, ResultCode::PEER_TIMEOUT) {
            self.stats.peer.timeouts += 1;
        }
    }

    /// Another director's answer to a peer request this one sent.
    fn peer_answer_from_mesh(&mut self, name: DirectorName, exchange: u32, response: &[u8]) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        if c.mesh
            .asked
            .get(&exchange)
            .is_none_or(|a| a.via.as_ref() != Some(&name))
        {
            self.stats.dropped.unexpected_message += 1;
            return;
        }
        let Ok(response) = Message::decode(response) else {
            self.stats.cluster.mesh_dropped.bad_message += 1;
            return;
        };
        let Some(asked) = c.mesh.asked.remove(&exchange) else {
            return;
        };
        let available = response.tlvs.result_code == Some(ResultCode::SUCCESS)
            && response.tlvs.peer_service_result == Some(PeerServiceResult::AVAILABLE);
        let mut reply = if available {
            let mut reply = Message::response_to(&asked.request, ResultCode::SUCCESS);
            reply.tlvs.peer_service_result = Some(PeerServiceResult::AVAILABLE);
            reply.tlvs.connection_info = response.tlvs.connection_info;
            reply.tlvs.candidates = response.tlvs.candidates.clone();
            reply.tlvs.peer_credentials = Some(PeerCredentials {
                token: asked.token,
                fingerprint: response.tlvs.certificate_fingerprint,
            });
            self.remember_remote_peer(asked.initiator, asked.peer, name);
            self.stats.peer.introductions += 1;
            reply
        } else {
            self.stats.peer.refused_by_destination += 1;
            let mut reply = Message::response_to(&asked.request, ResultCode::PEER_UNAVAILABLE);
            reply.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
            reply
        };
        reply.tlvs.service_type = Some(ServiceType::PEER);
        reply.tlvs.peer_internal_address = Some(asked.peer);
        self.answer_initiator(asked.initiator, &asked.request, &reply);
    }

    /// Another director asks this one to introduce its client to the client at
    /// `destination`: forwarded to that client if it is here, capable and active, signed
    /// with its key under a sequence number of this director; refused otherwise.
    fn peer_request_from_mesh(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        name: DirectorName,
        exchange: u32,
        destination: IpAddr,
        request: &[u8],
    ) {
        let Ok(mut forward) = Message::decode(request) else {
            self.stats.cluster.mesh_dropped.bad_message += 1;
            return;
        };
        // A link speaks for its own clients only.
        let initiator = forward
            .tlvs
            .peer_internal_address
            .filter(|a| self.in_pools(*a) && !self.by_addr.contains_key(a));
        let well_formed = forward.header.message_type == MessageType::CLIENT_SERVICE_REQUEST
            && forward.tlvs.service_type == Some(ServiceType::PEER)
            && forward.tlvs.service_action == Some(ServiceAction::ESTABLISH)
            && forward.tlvs.peer_credentials.is_some();
        let dest = self.by_addr.get(&destination).copied();
        let target = dest.and_then(|id| {
            let t = self.tunnels.get(&id)?;
            let capable = t.capabilities.contains(Capabilities::PEER_TUNNELING);
            Some((id, t.connection.filter(|_| capable)?, t.transport))
        });
        let room = self
            .cluster
            .as_deref()
            .is_some_and(|c| c.mesh.forwarded.len() < MAX_REMOTE_PEER);
        let target = target.zip(initiator).filter(|_| well_formed && room);
        let Some(((dest, dest_connection, transport), initiator)) = target else {
            let mut refusal = Message::new(MessageType::CLIENT_SERVICE_RESPONSE, 0, 0);
            refusal.tlvs.result_code = Some(ResultCode::PEER_UNAVAILABLE);
            refusal.tlvs.service_type = Some(ServiceType::PEER);
            refusal.tlvs.peer_service_result = Some(PeerServiceResult::UNAVAILABLE);
            return self.answer_mesh_peer(connection, exchange, &refusal);
        };
        let sequence = self.next_director_sequence();
        forward.header.sequence = sequence;
        forward.header.tunnel_id = dest;
        forward.tlvs.message_integrity = None;
        let mut bytes = Vec::new();
        if !self.encode_control(Some(dest), &forward, &mut bytes) {
            return;
        }
        self.control_out.push_back((dest_connection, bytes.clone()));
        let deadline = now + self.config.peer_answer_timeout;
        let rto = now + self.config.retransmit.rto(1);
        let next = if transport.is_datagram() {
            rto.min(deadline)
        } else {
            deadline
        };
        self.timers
            .push(Reverse((next, Timer::MeshForward(sequence))));
        if let Some(c) = self.cluster.as_deref_mut() {
            c.mesh.forwarded.insert(
                sequence,
                Forwarded {
                    via: name,
                    exchange,
                    destination: dest,
                    initiator,
                    bytes,
                    sent: 1,
                    deadline,
                },
            );
        }
        self.stats.cluster.peer_requests_relayed += 1;
    }

    /// The retransmission and answer timer of a peer request forwarded for another director.
    pub(super) fn mesh_forward_timer(&mut self, now: Instant, sequence: u32) {
        let Some(c) = self.cluster.as_deref_mut() else {
            return;
        };
        let Some(f) = c.mesh.forwarded.get_mut(&sequence) else {
            return;
        };
        if now >= f.deadline {
            // The initiator's director gives up at the same time.
            c.mesh.forwarded.remove(&sequence);
            return;
        }
        let target = self.tunnels.get(&f.destination);
        if let Some(connection) = target.and_then(|t| t.connection) {
            f.sent += 1;
            self.control_out.push_back((connection, f.bytes.clone()));
        }
        let next = (now + self.config.retransmit.rto(f.sent)).min(f.deadline);
        self.timers
            .push(Reverse((next, Timer::MeshForward(sequence))));
    }

    /// A Client Service Response from tunnel `id`: true if it answers a request forwarded for
    /// another director, which then gets it.
    pub(super) fn mesh_peer_answered(&mut self, id: u64, response: &Message<'_>) -> bool {
        let sequence = response.header.sequence;
        let Some(c) = self.cluster.as_deref_mut() else {
            return false;
        };
        if c.mesh
            .forwarded
            .get(&sequence)
            .is_none_or(|f| f.destination != id)
        {
            return false;
        }
        let Some(f) = c.mesh.forwarded.remove(&sequence) else {
            return false;
        };
        let Some(connection) = c.mesh.links.get(&f.via).map(|l| l.connection) else {
            return true;
        };
        let mut answer = Message::new(MessageType::CLIENT_SERVICE_RESPONSE, 0, 0);
        answer.tlvs.result_code = response.tlvs.result_code;
        answer.tlvs.service_type = Some(ServiceType::PEER);
        answer.tlvs.peer_service_result = response.tlvs.peer_service_result;
        answer.tlvs.connection_info = response.tlvs.connection_info;
        answer.tlvs.candidates = response.tlvs.candidates.clone();
        answer.tlvs.certificate_fingerprint = response.tlvs.certificate_fingerprint;
        self.answer_mesh_peer(connection, f.exchange, &answer);
        let available = response.tlvs.result_code == Some(ResultCode::SUCCESS)
            && response.tlvs.peer_service_result == Some(PeerServiceResult::AVAILABLE);
        if available {
            self.remember_remote_peer(f.destination, f.initiator, f.via);
        }
        true
    }

    fn answer_mesh_peer(
        &mut self,
        connection: ConnectionHandle,
        exchange: u32,
        answer: &Message<'_>,
    ) {
        let mut bytes = Vec::new();
        if answer.encode(&mut bytes).is_ok() {
            let message = MeshMessage::PeerAnswer {
                exchange,
                response: &bytes,
            };
            self.send_mesh(connection, &message);
        }
    }
}
