//! The tunnel life cycle on the director: active → persistent → closed, release
//! notifications and their retransmission (`docs/PROTOCOL.md` §3.5).

use std::cmp::Reverse;
use std::time::Instant;

use super::{ConnectionHandle, DirectorEvent, Outstanding, SessionDirector, Timer};
use crate::wire::{Message, MessageType, ResultCode, Transport};

impl SessionDirector {
    pub(super) fn notify_release(
        &mut self,
        now: Instant,
        connection: ConnectionHandle,
        tunnel_id: u64,
        reason: ResultCode,
    ) {
        let sequence = self.next_director_sequence();
        let mut message = Message::new(
            MessageType::CONFIGURATION_RELEASE_NOTIFICATION,
            sequence,
            tunnel_id,
        );
        message.tlvs.result_code = Some(reason);
        let mut bytes = Vec::new();
        if !self.encode_control(Some(tunnel_id), &message, &mut bytes) {
            return;
        }
        let key = self.tunnels.get(&tunnel_id).map(|t| t.key.clone());
        self.control_out.push_back((connection, bytes.clone()));
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        if conn.info.transport.is_datagram() {
            if conn.notification.is_none() {
                self.outstanding_notifications += 1;
            }
            conn.notification = Some(Outstanding {
                sequence,
                bytes,
                sent: 1,
                key,
            });
            let at = now + self.config.retransmit.rto(1);
            self.timers
                .push(Reverse((at, Timer::Notification(connection))));
        } else {
            self.drop_connection(connection);
        }
    }

    pub(super) fn retransmit_notification(&mut self, now: Instant, connection: ConnectionHandle) {
        let max = self.config.retransmit.max_transmissions;
        let Some(conn) = self.connections.get_mut(&connection) else {
            return;
        };
        let Some(out) = conn.notification.as_mut() else {
            return;
        };
        if out.sent >= max {
            conn.notification = None;
            self.outstanding_notifications -= 1;
            self.drop_connection(connection);
            return;
        }
        out.sent += 1;
        let bytes = out.bytes.clone();
        let at = now + self.config.retransmit.rto(out.sent);
        self.control_out.push_back((connection, bytes));
        self.timers
            .push(Reverse((at, Timer::Notification(connection))));
    }

    /// An acknowledgement of the release notification outstanding on `connection`, signed by
    /// the client of the closed tunnel: the notification is done and the connection closed.
    pub(super) fn ack_notification(
        &mut self,
        connection: ConnectionHandle,
        sequence: u32,
        encoded: &[u8],
    ) -> bool {
        let Some(conn) = self.connections.get_mut(&connection) else {
            return false;
        };
        if conn.notification.as_ref().is_some_and(|n| {
            n.sequence == sequence
                && n.key
                    .as_ref()
                    .is_some_and(|k| k.verify_from_client(encoded))
        }) {
            conn.notification = None;
            self.outstanding_notifications -= 1;
            self.drop_connection(connection);
            return true;
        }
        false
    }

    /// The liveness timer of tunnel `id` fired: an active tunnel silent for its idle
    /// intervals becomes persistent and its connection is closed; one the director has sent
    /// nothing for one keepalive interval gets a Keepalive (§3.5).
    pub(super) fn check_liveness(&mut self, now: Instant, id: u64) {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        t.liveness_armed = false;
        let Some(connection) = t.connection else {
            return;
        };
        if t.last_heard + t.keepalive * self.config.idle_intervals <= now {
            self.make_persistent(now, id);
            self.drop_connection(connection);
            return;
        }
        let keepalive_due = t.since + t.keepalive <= now;
        if keepalive_due {
            t.since = now;
            self.send_keepalive(connection, id);
        }
        self.schedule_liveness(id);
    }

    /// A Configuration Request for a new tunnel came from the UDP address of tunnel `id`: the
    /// tunnel is sent a Keepalive, and unless its client is heard from within
    /// `address_check_timeout` it leaves the address (§3.3). One check at a time per tunnel, so
    /// that requests from a sender forging the address cost one Keepalive per timeout at most.
    pub(super) fn check_address(&mut self, now: Instant, connection: ConnectionHandle, id: u64) {
        let udp = self
            .connections
            .get(&connection)
            .is_some_and(|c| c.info.transport == Transport::UDP);
        let Some(t) = self.tunnels.get_mut(&id).filter(|t| !t.address_check) else {
            return;
        };
        if !udp {
            return;
        }
        t.address_check = true;
        self.send_keepalive(connection, id);
        let at = now + self.config.address_check_timeout;
        self.timers.push(Reverse((at, Timer::AddressCheck(id))));
    }

    /// The address check of tunnel `id` ends: a tunnel whose client was not heard from since
    /// it began goes persistent and gives its connection up.
    pub(super) fn end_address_check(&mut self, now: Instant, id: u64) {
        let began = now.checked_sub(self.config.address_check_timeout);
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        t.address_check = false;
        // Heard after the check began: the client answered; at its start, it had not yet.
        let silent = began.is_some_and(|b| t.last_heard <= b);
        let Some(connection) = t.connection.filter(|_| silent) else {
            return;
        };
        self.stats.address_takeovers += 1;
        self.make_persistent(now, id);
        self.drop_connection(connection);
    }

    /// Sends the director's own Keepalive on tunnel `id`, signed (§3.5, §4.4). It is not
    /// retransmitted: the next one is due an interval later if nothing else went out.
    fn send_keepalive(&mut self, connection: ConnectionHandle, id: u64) {
        let sequence = self.next_director_sequence();
        if let Some(t) = self.tunnels.get_mut(&id) {
            t.keepalive_sequence = sequence;
        }
        let message = Message::new(MessageType::KEEPALIVE, sequence, id);
        let mut bytes = self.spare.pop().unwrap_or_default();
        bytes.clear();
        if self.encode_control(Some(id), &message, &mut bytes) {
            self.control_out.push_back((connection, bytes));
            self.stats.keepalives_sent += 1;
        }
    }

    pub(super) fn check_persistence(&mut self, now: Instant, id: u64) {
        let Some(t) = self.tunnels.get(&id).filter(|t| t.connection.is_none()) else {
            return;
        };
        let since = t.since;
        let deadline = since + self.config.persistence_timeout;
        if deadline > now {
            self.timers
                .push(Reverse((deadline, Timer::Persistence(id))));
        } else {
            self.close(now, id, ResultCode::TIMEOUT);
        }
    }

    pub(super) fn make_persistent(&mut self, now: Instant, id: u64) {
        let Some(t) = self.tunnels.get_mut(&id) else {
            return;
        };
        if t.connection.take().is_none() {
            return;
        }
        t.since = now;
        // Frames not yet polled are held for the re-attach, the freshest within the held
        // bounds.
        self.queued_frames -= t.queue.len();
        let room = self
            .config
            .max_total_held_frames
            .saturating_sub(self.held_frames);
        let keep = t.queue.len().min(self.config.max_held_frames).min(room);
        let dropped = t.queue.len() - keep;
        self.stats.dropped.held_full += dropped as u64;
        t.queue.drain(..dropped);
        self.held_frames += keep;
        let at = now + self.config.persistence_timeout;
        self.timers.push(Reverse((at, Timer::Persistence(id))));
        self.events
            .push_back(DirectorEvent::TunnelPersistent { tunnel_id: id });
    }

    pub(super) fn close(&mut self, now: Instant, id: u64, reason: ResultCode) {
        let Some(t) = self.tunnels.remove(&id) else {
            return;
        };
        for addr in t.addresses() {
            self.by_addr.remove(&addr);
        }
        if let (Some((_, offset)), Some(pool)) = (t.ipv4, self.ipv4_pool.as_mut()) {
            pool.release(offset);
        }
        if let (Some((_, offset)), Some(pool)) = (t.ipv6, self.ipv6_pool.as_mut()) {
            pool.release(offset);
        }
        match t.connection {
            Some(_) => self.queued_frames -= t.queue.len(),
            None => self.held_frames -= t.queue.len(),
        }
        if let Some(c) = t.connection.and_then(|c| self.connections.get_mut(&c)) {
            c.tunnel = None;
        }
        let addresses: Vec<_> = t.addresses().collect();
        self.peer_tunnel_closed(now, id, &addresses);
        self.remove_record(id, addresses);
        self.stats.tunnels_closed += 1;
        self.events.push_back(DirectorEvent::TunnelClosed {
            tunnel_id: id,
            reason,
        });
    }

    /// Forgets a connection and tells the runtime to close it.
    pub(super) fn drop_connection(&mut self, connection: ConnectionHandle) {
        let Some(conn) = self.connections.remove(&connection) else {
            return;
        };
        self.forgot(&conn);
        self.events
            .push_back(DirectorEvent::CloseConnection { connection });
    }
}
