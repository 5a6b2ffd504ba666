//! The metrics of `tscf server` and `tscf client`, in the Prometheus text format (encoded by
//! `prometheus-client`), made on each scrape from a snapshot of the counters the core keeps.
//!
//! Names follow Prometheus's conventions: `tscf_server_…` and `tscf_client_…`, counters end in
//! `_total` (the encoder adds it), durations are in seconds and sizes in octets (`_bytes`).
//! Every counter that counts something dropped is one `reason` of a `…_dropped_total` family,
//! every connection the server cut or refused one `reason` of
//! `tscf_server_connections_closed_total`.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tscf_runtime_smol::core::client::{ClientState, PeerDownReason, PeerTunnelState};
use tscf_runtime_smol::core::histogram::DurationHistogram;
use tscf_runtime_smol::core::wire::Transport;
use tscf_runtime_smol::{Notification, ServerStats, TunnelStats};

use crate::http::Answer;

/// Encodes `collector` as the Prometheus text format.
fn answer(collector: impl Collector) -> Answer {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(collector));
    let mut body = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut body, &registry);
    (
        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        body,
    )
}

/// A server's metrics, from its statistics.
pub(crate) fn server(stats: ServerStats) -> Answer {
    answer(ServerMetrics(stats))
}

/// A client's metrics.
pub(crate) fn client(snapshot: ClientSnapshot) -> Answer {
    answer(snapshot)
}

/// What one scrape of a client shows.
#[derive(Debug)]
pub(crate) struct ClientSnapshot {
    /// Where the client is.
    pub(crate) state: ClientState,
    /// Its counters.
    pub(crate) stats: TunnelStats,
    /// The peer tunnels that are up, by what they run over.
    pub(crate) peer_tunnels: BTreeMap<&'static str, usize>,
    /// Peers in each phase of their setup or life.
    pub(crate) peers: BTreeMap<&'static str, usize>,
    /// What the program saw of the notifications.
    pub(crate) outcomes: PeerOutcomes,
}

/// How peer negotiations ended and why peer tunnels went down, counted from the client's
/// notifications.
#[derive(Clone, Debug, Default)]
pub(crate) struct PeerOutcomes {
    negotiations: BTreeMap<&'static str, u64>,
    downs: BTreeMap<&'static str, u64>,
}

impl PeerOutcomes {
    /// Counts `note`; `was_up` says whether its peer had a tunnel up.
    pub(crate) fn note(&mut self, note: &Notification, was_up: bool) {
        match note {
            Notification::PeerTunnelUp { .. } => {
                *self.negotiations.entry("up").or_default() += 1;
            }
            Notification::PeerTunnelDown { reason, .. } if was_up => {
                *self.downs.entry(reason_label(*reason)).or_default() += 1;
            }
            Notification::PeerTunnelDown { reason, .. } => {
                *self.negotiations.entry(reason_label(*reason)).or_default() += 1;
            }
            _ => {}
        }
    }
}

/// A [`PeerDownReason`] as a label value.
pub(crate) fn reason_label(reason: PeerDownReason) -> &'static str {
    match reason {
        PeerDownReason::Released => "released",
        PeerDownReason::Silence => "silence",
        PeerDownReason::PeerServerTunnelGone => "peer_server_tunnel_gone",
        PeerDownReason::Unavailable(_) => "unavailable",
        PeerDownReason::EstablishTimeout => "establish_timeout",
        PeerDownReason::ServerTunnelLost => "server_tunnel_lost",
        PeerDownReason::Replaced => "replaced",
        PeerDownReason::StreamLost => "stream_lost",
        PeerDownReason::SessionFailed => "session_failed",
        PeerDownReason::SessionLost => "session_lost",
        PeerDownReason::InsecureRefused => "insecure_refused",
        _ => "other",
    }
}

/// A transport as a label value.
pub(crate) fn transport_label(transport: Transport) -> &'static str {
    match transport {
        Transport::UDP => "udp",
        Transport::TCP => "tcp",
        Transport::TLS => "tls",
        Transport::DTLS => "dtls",
        Transport::QUIC => "quic",
        _ => "other",
    }
}

/// A peer's phase as a label value.
pub(crate) fn peer_state_label(state: PeerTunnelState) -> &'static str {
    match state {
        PeerTunnelState::Discovering => "discovering",
        PeerTunnelState::Requesting => "requesting",
        PeerTunnelState::AwaitingPeer => "awaiting_peer",
        PeerTunnelState::Probing => "probing",
        PeerTunnelState::Handshaking => "handshaking",
        PeerTunnelState::Nominating => "nominating",
        PeerTunnelState::Up => "up",
        PeerTunnelState::Fallback => "fallback",
        _ => "other",
    }
}

/// Writes metric families into a scrape.
struct Out<'a, 'b>(&'a mut DescriptorEncoder<'b>);

impl Out<'_, '_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        let e = self
            .0
            .encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(e)
    }

    fn gauge(&mut self, name: &str, help: &str, value: usize) -> fmt::Result {
        let metric = ConstGauge::new(value as i64);
        let e = self
            .0
            .encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(e)
    }

    /// One counter per value of `label`.
    fn counters(
        &mut self,
        name: &str,
        help: &str,
        label: &str,
        values: &[(&str, u64)],
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (value, n) in values {
            let labels = [(label, *value)];
            ConstCounter::new(*n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }

    /// One counter per set of labels.
    fn labelled_counters<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        values: &[([(&str, &str); N], u64)],
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, n) in values {
            ConstCounter::new(*n).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// One gauge per set of labels.
    fn gauges<const N: usize>(
        &mut self,
        name: &str,
        help: &str,
        values: &[([(&str, &str); N], usize)],
    ) -> fmt::Result {
        let mut family = self
            .0
            .encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, n) in values {
            ConstGauge::new(*n as i64).encode(family.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn histogram(&mut self, name: &str, help: &str, h: &DurationHistogram) -> fmt::Result {
        let mut e = self
            .0
            .encode_descriptor(name, help, None, MetricType::Histogram)?;
        // The encoder adds the buckets up itself: it takes each bucket's own count.
        let mut below = 0;
        let mut buckets: Vec<(f64, u64)> = h
            .buckets()
            .map(|(bound, at_most)| {
                let own = at_most - below;
                below = at_most;
                (bound.as_secs_f64(), own)
            })
            .collect();
        buckets.push((f64::INFINITY, h.count() - below));
        e.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum().as_secs_f64(),
            h.count(),
            &buckets,
            None,
        )
    }
}

/// A server's statistics as metrics.
#[derive(Debug)]
struct ServerMetrics(ServerStats);

impl Collector for ServerMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut out = Out(&mut encoder);
        let s = &self.0;
        let d = &s.director;
        let t = &s.transport;
        // Every transport has its series, zero or not, so that none vanishes when its last
        // tunnel goes.
        let mut tunnels = Vec::new();
        let known = [
            Transport::TCP,
            Transport::TLS,
            Transport::UDP,
            Transport::DTLS,
            Transport::QUIC,
        ];
        let others = d
            .tunnels_by_transport
            .iter()
            .map(|b| b.transport)
            .filter(|t| !known.contains(t));
        for transport in known.into_iter().chain(others) {
            let held = d
                .tunnels_by_transport
                .iter()
                .find(|b| b.transport == transport);
            let (active, persistent) = held.map_or((0, 0), |b| (b.active, b.persistent));
            let transport = transport_label(transport);
            tunnels.push(([("state", "active"), ("transport", transport)], active));
            tunnels.push((
                [("state", "persistent"), ("transport", transport)],
                persistent,
            ));
        }
        out.gauges(
            "tscf_server_tunnels",
            "Tunnels held, by state (active: with a connection; persistent: waiting for a \
             re-attach) and the transport each was last seen on.",
            &tunnels,
        )?;
        out.gauge(
            "tscf_server_pending_connections",
            "Connections that have not completed a Configuration exchange.",
            d.pending_connections,
        )?;
        out.gauges(
            "tscf_server_connections",
            "Connections held by the transports: stream (TCP, TLS, QUIC, handshakes included), \
             udp (remote addresses), dtls (associations), dtls_half_open (handshakes).",
            &[
                ([("kind", "stream")], s.stream_connections),
                ([("kind", "udp")], s.udp_connections),
                ([("kind", "dtls")], s.dtls_associations),
                ([("kind", "dtls_half_open")], s.dtls_half_open),
            ],
        )?;
        let r = &d.refused;
        out.counters(
            "tscf_server_configuration_exchanges",
            "Configuration Requests answered, by result: ok (a new tunnel), reattached, or the \
             reason of a refusal.",
            "result",
            &[
                ("ok", d.tunnels_opened),
                ("reattached", d.reattaches),
                ("unauthorized", r.unauthorized),
                ("unkeyed", r.unkeyed),
                ("rate_limited", r.rate_limited),
                ("bad_reattach_secret", r.bad_reattach_secret),
                ("tunnel_not_found", r.tunnel_not_found),
                ("server_full", r.server_full),
                ("no_address", r.no_address),
            ],
        )?;
        out.counter(
            "tscf_server_tunnels_closed",
            "Tunnels closed.",
            d.tunnels_closed,
        )?;
        out.counter(
            "tscf_server_control_answered",
            "Control messages answered.",
            d.control_answered,
        )?;
        out.counter(
            "tscf_server_control_answers_undelivered",
            "Answers to control messages that the transport could not deliver (a full stream \
             queue, a closing connection); not counted as answered.",
            d.answers_undelivered,
        )?;
        out.counter(
            "tscf_server_keepalives_sent",
            "Keepalives the director sent on tunnels it had sent nothing for one keepalive \
             interval.",
            d.keepalives_sent,
        )?;
        out.counter(
            "tscf_server_tunnels_one_family_only",
            "Tunnels opened with an address of one family only, the other family's pool being \
             exhausted.",
            d.one_family_only,
        )?;
        out.counter(
            "tscf_server_address_takeovers",
            "Tunnels on UDP that left their address to a new client, not having answered the \
             keepalive sent when the new client asked for a tunnel there.",
            d.address_takeovers,
        )?;
        out.counter(
            "tscf_server_tunnel_moves",
            "Tunnels that followed their client to a new connection (a new address) on an \
             authenticated request from there.",
            d.moves,
        )?;
        out.counter(
            "tscf_server_control_errors",
            "Control messages answered with an error result (malformed, unknown, version).",
            r.protocol_errors,
        )?;
        out.counter(
            "tscf_server_relayed_frames",
            "Data frames relayed from one tunnel to another.",
            d.frames_relayed,
        )?;
        out.counter(
            "tscf_server_relayed_bytes",
            "Octets of inner packets relayed.",
            d.bytes_relayed,
        )?;
        let x = &d.dropped;
        out.counters(
            "tscf_server_dropped",
            "Envelopes, frames and datagrams dropped, by reason.",
            "reason",
            &[
                ("bad_envelope", x.bad_envelope),
                ("unknown_envelope_type", x.unknown_envelope_type),
                ("not_configured", x.not_configured),
                ("bad_packet", x.bad_packet),
                ("oversized", x.oversized),
                ("spoofed_source", x.spoofed_source),
                ("unknown_destination", x.unknown_destination),
                ("queue_full", x.queue_full),
                ("held_full", x.held_full),
                ("bad_control", x.bad_control),
                ("tunnel_mismatch", x.tunnel_mismatch),
                ("unauthenticated", x.unauthenticated),
                ("replayed", x.replayed),
                ("unexpected_message", x.unexpected_message),
                ("unknown_connection", x.unknown_connection),
                ("stream_queue_full", t.stream_queue_full),
                ("sent_to_closed", t.sent_to_closed),
                ("udp_not_tscf", t.udp_dropped),
                ("udp_send_error", t.udp_send_errors),
                ("dtls_unknown_source", t.dtls_unknown_source),
                ("dtls_bad_record", t.dtls_bad_records),
                ("dtls_bad_cookie", t.dtls_bad_cookies),
            ],
        )?;
        out.counters(
            "tscf_server_connections_closed",
            "Connections the server refused or cut, and handshakes that failed, by reason.",
            "reason",
            &[
                ("refused", t.streams_refused),
                ("refused_per_source", t.streams_refused_per_source),
                ("evicted", t.streams_evicted),
                ("framing_error", t.framing_errors),
                ("write_timeout", t.stream_write_timeouts),
                ("close_timeout", t.stream_close_timeouts),
                ("tls_handshake_failed", t.tls_handshake_failures),
                ("quic_handshake_failed", t.quic_handshake_failures),
                ("dtls_handshake_failed", t.dtls_handshake_failures),
                ("dtls_half_open_evicted", t.dtls_half_open_evicted),
            ],
        )?;
        out.counters(
            "tscf_server_transport_events",
            "Transport work: stream connections accepted, DTLS handshakes completed, stateless \
             DTLS HelloVerifyRequests and QUIC Retries sent, STUN Binding requests answered.",
            "kind",
            &[
                ("stream_accepted", t.streams_accepted),
                ("dtls_completed", t.dtls_handshakes),
                ("dtls_hello_verify", t.dtls_hello_verify_sent),
                ("quic_retry", t.quic_retries),
                ("stun_answered", t.stun_answered),
            ],
        )?;
        out.counters(
            "tscf_server_quic_datagrams",
            "Data envelopes carried as QUIC datagrams, by direction.",
            "direction",
            &[
                ("sent", t.quic_datagrams_sent),
                ("received", t.quic_datagrams_received),
            ],
        )?;
        let p = &d.peer;
        out.counters(
            "tscf_server_peer_negotiations",
            "Peer requests the director handled, by outcome: introduced (the pair was \
             introduced), refused_by_destination, timed_out, rate_limited, \
             introductions_limited.",
            "outcome",
            &[
                ("introduced", p.introductions),
                ("refused_by_destination", p.refused_by_destination),
                ("timed_out", p.timeouts),
                ("rate_limited", p.rate_limited),
                ("introductions_limited", p.introductions_limited),
            ],
        )?;
        out.counter(
            "tscf_server_peer_requests_forwarded",
            "Peer requests forwarded to their destination.",
            p.requests_forwarded,
        )?;
        out.counter(
            "tscf_server_peer_answered_from_announcement",
            "Peer requests answered at once from the destination's announced candidates.",
            p.answered_from_announcement,
        )?;
        out.counter(
            "tscf_server_peer_release_notices",
            "Release notices sent to peers because a server tunnel closed.",
            p.release_notices,
        )?;
        out.counter(
            "tscf_server_peer_release_notices_held",
            "Release notices held for a persistent tunnel, to be sent on its re-attach.",
            p.release_notices_held,
        )?;
        out.counter(
            "tscf_server_peer_candidates_dropped",
            "Peer candidates not forwarded (implausible or duplicate).",
            p.candidates_dropped,
        )?;
        let c = &d.cluster;
        out.counters(
            "tscf_server_cluster_registry",
            "A director of a cluster and its registry: requests issued, answered failed, \
             answers naming no request (unexpected), requests not issued with too many in \
             flight (saturated), and recoveries (every record put again after failures).",
            "event",
            &[
                ("requests", c.registry_requests),
                ("failures", c.registry_failures),
                ("unexpected", c.registry_unexpected),
                ("saturated", c.registry_saturated),
                ("recoveries", c.registry_recoveries),
            ],
        )?;
        out.counters(
            "tscf_server_cluster_addresses",
            "Addresses the registry granted to the director's stock (claimed) or refused \
             (another director holds them).",
            "outcome",
            &[
                ("claimed", c.addresses_claimed),
                ("refused", c.addresses_refused),
            ],
        )?;
        out.counters(
            "tscf_server_cluster_tunnels",
            "Tunnels adopted from another director (their client re-attached here), and \
             tunnels dropped because another director adopted them (moved_away).",
            "event",
            &[("adopted", c.adoptions), ("moved_away", c.moved_away)],
        )?;
        out.counter(
            "tscf_server_cluster_parked",
            "Re-attach requests for tunnels held elsewhere, parked while the registry is asked.",
            c.parked,
        )?;
        out.counters(
            "tscf_server_cluster_dropped",
            "Requests a director of a cluster dropped: Configuration Requests while its stock \
             of addresses was empty (stock_empty), re-attach requests not parked because too \
             many were (parked_full) or their lookup would have gone beyond the lookup rate \
             (lookups_limited).",
            "reason",
            &[
                ("stock_empty", c.stock_empty),
                ("parked_full", c.parked_full),
                ("lookups_limited", c.lookups_limited),
            ],
        )?;
        out.counter(
            "tscf_server_cluster_route_lookups",
            "Lookups of the director that holds an address, sent to the registry.",
            c.route_lookups,
        )?;
        out.counter(
            "tscf_server_cluster_peer_requests_relayed",
            "Peer requests forwarded to another director, or answered for one.",
            c.peer_requests_relayed,
        )?;
        out.counter(
            "tscf_server_cluster_peer_gone_sent",
            "Peer Gone messages sent: a closed tunnel's partners held by other directors.",
            c.peer_gone_sent,
        )?;
        out.counters(
            "tscf_server_mesh_links",
            "Mesh links to other directors: dials started, links opened.",
            "event",
            &[("dialed", c.mesh_dials), ("opened", c.mesh_links)],
        )?;
        out.counters(
            "tscf_server_mesh_envelopes",
            "Envelopes on mesh links, by direction (received, queued to send).",
            "direction",
            &[("received", c.mesh_frames_in), ("sent", c.mesh_frames_out)],
        )?;
        let m = &c.mesh_dropped;
        out.counters(
            "tscf_server_mesh_dropped",
            "What the mesh dropped: packets for an address being looked up (awaiting_route) \
             or whose director is not linked (no_link), the link's queue full (queue_full); \
             from a link: packets for no local tunnel (not_here), with a local or foreign \
             source (spoofed_source), too large (oversized), not one IP packet (bad_packet), \
             Peer Gone partners not introduced (not_introduced), and messages that do not \
             decode or are out of turn (bad_message).",
            "reason",
            &[
                ("awaiting_route", m.awaiting_route),
                ("no_link", m.no_link),
                ("queue_full", m.queue_full),
                ("not_here", m.not_here),
                ("spoofed_source", m.spoofed_source),
                ("not_introduced", m.not_introduced),
                ("oversized", m.oversized),
                ("bad_packet", m.bad_packet),
                ("bad_message", m.bad_message),
            ],
        )?;
        out.gauge(
            "tscf_server_queued_frames",
            "Data frames waiting in the tunnels' queues.",
            d.queued_frames,
        )?;
        out.gauge(
            "tscf_server_stream_queued_bytes",
            "Octets of envelopes waiting for the stream connections' writers.",
            s.stream_queued_bytes,
        )
    }
}

impl Collector for ClientSnapshot {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut out = Out(&mut encoder);
        let s = &self.stats;
        let c = &s.client;
        let p = &c.peer;
        let state = match self.state {
            ClientState::Connecting => "connecting",
            ClientState::Connected => "connected",
            ClientState::Reattaching => "reattaching",
            ClientState::Releasing => "releasing",
            ClientState::Terminated => "terminated",
            _ => "other",
        };
        let states = [
            "connecting",
            "connected",
            "reattaching",
            "releasing",
            "terminated",
        ]
        .map(|name| ([("state", name)], usize::from(name == state)));
        out.gauges(
            "tscf_client_state",
            "1 for the state the client is in, 0 for the others.",
            &states,
        )?;
        out.counters(
            "tscf_client_configuration_exchanges",
            "Configuration exchanges that succeeded: connected (a new tunnel), reattached.",
            "result",
            &[("connected", c.connects), ("reattached", c.reattaches)],
        )?;
        out.counter(
            "tscf_client_transports_lost",
            "Transports to the server lost.",
            c.transports_lost,
        )?;
        out.counter(
            "tscf_client_retransmissions",
            "Requests retransmitted.",
            c.retransmissions,
        )?;
        out.counter(
            "tscf_client_configuration_requests",
            "Configuration Requests sent, retransmissions included.",
            c.configuration_requests_sent,
        )?;
        out.counter(
            "tscf_client_server_path_refreshes",
            "Keepalives sent at once to refresh the path to the server when a peer tunnel went \
             down.",
            c.server_path_refreshes,
        )?;
        out.counter(
            "tscf_client_nat_rediscoveries",
            "NAT discoveries run again after a peer tunnel went silent.",
            p.rediscoveries,
        )?;
        out.counters(
            "tscf_client_envelopes",
            "Envelopes exchanged with the server, by direction.",
            "direction",
            &[
                ("sent", c.envelopes_sent),
                ("received", c.envelopes_received),
            ],
        )?;
        out.labelled_counters(
            "tscf_client_data_envelopes",
            "Data envelopes (inner packets), by path (relay, peer) and direction.",
            &[
                ([("path", "relay"), ("direction", "sent")], c.data_sent),
                (
                    [("path", "relay"), ("direction", "received")],
                    c.data_received,
                ),
                ([("path", "peer"), ("direction", "sent")], p.data_sent),
                (
                    [("path", "peer"), ("direction", "received")],
                    p.data_received,
                ),
            ],
        )?;
        out.counters(
            "tscf_client_dropped",
            "Packets, envelopes and datagrams dropped, by reason.",
            "reason",
            &[
                ("no_transport", c.dropped_no_transport),
                ("bad_envelope", c.dropped_bad_envelope),
                ("unknown_envelope", c.dropped_unknown_envelope),
                ("bad_control", c.dropped_bad_control),
                ("unmatched_response", c.dropped_unmatched_response),
                ("invalid_configuration", c.dropped_invalid_configuration),
                ("unexpected_request", c.dropped_unexpected_request),
                ("bad_packet", c.dropped_bad_packet),
                ("wrong_destination", c.dropped_wrong_destination),
                ("data_not_connected", c.dropped_data_not_connected),
                ("receive_queue_full", c.dropped_receive_queue_full),
                ("control_queue_full", c.dropped_control_queue_full),
                ("terminated", c.dropped_terminated),
                ("send_queue_full", c.send_queue_full),
                ("send_queue_discarded", c.send_queue_discarded),
                ("send_refused_not_connected", c.send_refused_not_connected),
                ("send_refused_closed", c.send_refused_closed),
                ("send_refused_too_large", c.send_refused_too_large),
                ("send_refused_invalid", c.send_refused_invalid),
                ("peer_integrity", p.integrity_failures),
                ("peer_unknown_peer", p.dropped_unknown_peer),
                ("peer_not_tscf", p.dropped_not_tscf),
                ("peer_bad_control", p.dropped_bad_control),
                ("peer_bad_data", p.dropped_bad_data),
                ("peer_stun", p.dropped_stun),
                ("peer_queue_full", p.dropped_queue_full),
                ("peer_receive_queue_full", p.dropped_receive_queue_full),
                ("peer_disabled", p.dropped_disabled),
                ("peer_unknown_stream", p.dropped_unknown_stream),
                ("peer_plain_on_secure", p.dropped_plain_on_secure),
                ("peer_unknown_session", p.dropped_unknown_session),
                ("unbound_port", s.unbound_port),
                ("not_udp", s.not_udp),
                ("socket_queue_full", s.socket_queue_full),
                ("udp_not_tscf", s.udp_dropped),
                ("peer_blocked", s.peer_blocked),
                ("stream_queue_full", s.stream_queue_full),
                ("notification", s.notifications_dropped),
                ("peer_quic_unauthorised", s.peer_quic_unauthorised),
                ("peer_quic_inbox_full", s.peer_quic_inbox_full),
                ("peer_quic_stream_full", s.peer_quic_stream_full),
                ("peer_dtls_unauthorised", s.peer_dtls_unauthorised),
                ("peer_dtls_bad_record", s.peer_dtls_bad_records),
                ("peer_dtls_unknown_source", s.peer_dtls_unknown_source),
                ("peer_send_error", s.peer_send_errors),
            ],
        )?;
        let outcomes: Vec<(&str, u64)> = self
            .outcomes
            .negotiations
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        out.counters(
            "tscf_client_peer_negotiations",
            "Peer tunnel negotiations, by outcome: up, or the reason the setup failed.",
            "outcome",
            &outcomes,
        )?;
        let downs: Vec<(&str, u64)> = self.outcomes.downs.iter().map(|(k, v)| (*k, *v)).collect();
        out.counters(
            "tscf_client_peer_tunnels_down",
            "Peer tunnels that went down after being up, by reason.",
            "reason",
            &downs,
        )?;
        let up: Vec<([(&str, &str); 1], usize)> = self
            .peer_tunnels
            .iter()
            .map(|(transport, n)| ([("transport", *transport)], *n))
            .collect();
        out.gauges(
            "tscf_client_peer_tunnels",
            "Peer tunnels up, by what they run over (udp, dtls, quic, or a tcp or tls peer \
             stream).",
            &up,
        )?;
        let peers: Vec<([(&str, &str); 1], usize)> = self
            .peers
            .iter()
            .map(|(state, n)| ([("state", *state)], *n))
            .collect();
        out.gauges(
            "tscf_client_peers",
            "Peers the client holds peer tunneling state for, by phase.",
            &peers,
        )?;
        out.counters(
            "tscf_client_peer_probes",
            "Peer Probes: sent, answered (ours to theirs), responses received.",
            "kind",
            &[
                ("sent", p.probes_sent),
                ("answered", p.probes_answered),
                ("responses", p.probe_responses),
            ],
        )?;
        out.counters(
            "tscf_client_peer_sessions",
            "Peer sessions (DTLS, QUIC): opened as initiator, authorised as destination, open, \
             failed, refused.",
            "kind",
            &[
                ("opened", p.sessions_opened),
                ("authorised", p.sessions_authorised),
                ("open", s.peer_sessions_open),
                ("failed", s.peer_session_failures),
                ("refused", s.peer_sessions_refused),
            ],
        )?;
        out.histogram(
            "tscf_client_peer_setup_seconds",
            "Time from the first opted-in packet (or the forwarded request) to the peer tunnel \
             up.",
            &p.setup_times,
        )?;
        out.histogram(
            "tscf_client_peer_silence_to_relay_seconds",
            "For peer tunnels that went silent: time from the last packet heard on the path to \
             the flows back on the relay.",
            &p.silence_to_relay,
        )?;
        out.gauge(
            "tscf_client_send_queue_packets",
            "Inner packets waiting for a transport to the server.",
            s.send_queue,
        )?;
        out.gauge(
            "tscf_client_stream_queued_bytes",
            "Octets of envelopes waiting for the stream writers (server transport, peer \
             streams).",
            s.stream_queued_bytes,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;

    use super::*;

    /// Every counter and gauge of [`ServerStats`] is a metric: each is given a value of its
    /// own (through the statistics' serialized form, so that none is named here), and each
    /// value must be a sample of the scrape.
    #[test]
    fn every_server_counter_is_a_metric() {
        let mut value = serde_json::to_value(ServerStats::default()).expect("statistics serialize");
        let mut fields = Vec::new();
        number(&mut value, "", &mut fields);
        assert!(fields.len() > 50, "{fields:?}");
        let stats: ServerStats = serde_json::from_value(value).expect("statistics deserialize");
        let (_, body) = server(stats);
        let samples: HashSet<&str> = body
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next())
            .collect();
        // Summed over the transports of `tscf_server_tunnels`.
        let derived = [".director.active_tunnels", ".director.persistent_tunnels"];
        let missing: Vec<&String> = fields
            .iter()
            .filter(|(name, _)| !derived.contains(&name.as_str()))
            .filter(|(_, n)| !samples.contains(n.to_string().as_str()))
            .map(|(name, _)| name)
            .collect();
        assert!(missing.is_empty(), "not in the metrics: {missing:?}");
    }

    /// Gives every number in `value` a distinct value, far apart so that no sum of two is a
    /// third, and lists them with their paths.
    fn number(value: &mut Value, path: &str, out: &mut Vec<(String, u64)>) {
        match value {
            Value::Object(fields) => {
                for (name, field) in fields {
                    number(field, &format!("{path}.{name}"), out);
                }
            }
            Value::Number(_) => {
                let n = 1_000_003 + 1_000 * out.len() as u64;
                *value = n.into();
                out.push((path.to_owned(), n));
            }
            _ => {}
        }
    }
}
