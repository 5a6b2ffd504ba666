//! What happened to a tunnel, for the application.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use crate::client::{ClientEvent, PeerDownReason, ServerEndpoint, TerminateReason, TunnelInfo};
use crate::wire::{CandidateKind, ResultCode};

/// What happened to a tunnel, for the application.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Notification {
    /// A fresh tunnel is up (the first, or a new one after the server closed the old).
    Connected(TunnelInfo),
    /// The transport to the server was lost; the client re-attaches by itself.
    TransportLost,
    /// The tunnel is back on a new transport with the same id and addresses.
    Reattached(TunnelInfo),
    /// The server closed the tunnel; a fresh one follows with [`Notification::Connected`].
    TunnelClosed {
        /// The reason the server gave.
        reason: ResultCode,
    },
    /// One attempt at a server failed.
    ConnectFailed {
        /// The server.
        server: ServerEndpoint,
        /// Its result code, or `None` for a transport failure or timeout.
        result: Option<ResultCode>,
        /// The transport failure, as text, when there was one.
        error: Option<String>,
    },
    /// NAT discovery of the peer socket finished (with the STUN servers of the configuration,
    /// or else the STUN responder the server announced).
    NatDiscovered {
        /// The peer socket's address as a STUN server saw it, if one answered.
        public: Option<SocketAddr>,
        /// Whether the NAT maps per destination; `None` when fewer than two servers answered.
        varies_by_destination: Option<bool>,
    },
    /// A peer tunnel is up: packets of opted-in sockets to `peer` now go straight to it.
    PeerTunnelUp {
        /// The peer's internal address.
        peer: IpAddr,
        /// The peer's address on the direct path.
        path: SocketAddr,
        /// From the first opted-in packet (or the director's forwarded request) to up.
        setup: Duration,
        /// Whether this client initiated the negotiation (else the peer did, through the
        /// server).
        initiator: bool,
        /// The kind of our candidate on the path, when known (see
        /// [`ClientEvent::PeerTunnelUp`]).
        local_kind: Option<CandidateKind>,
        /// The kind of the peer's candidate on the path, when known.
        remote_kind: Option<CandidateKind>,
    },
    /// A peer tunnel went down, or its setup failed: packets to `peer` take the relay.
    PeerTunnelDown {
        /// The peer's internal address.
        peer: IpAddr,
        /// Why.
        reason: PeerDownReason,
    },
    /// The tunnel is finished. Always the last notification.
    Terminated {
        /// Why.
        reason: TerminateReason,
    },
}

impl Notification {
    /// The notification for a client event; `None` for the events that are instructions to
    /// the host (open or close a transport, a peer stream or a peer session).
    /// `last_failure` keeps the text of the last failed attempt, which a
    /// [`ConnectFailed`](Self::ConnectFailed) without a result code carries.
    pub(super) fn of(event: ClientEvent, last_failure: &mut Option<String>) -> Option<Self> {
        let note = match event {
            ClientEvent::Connected(info) => Self::Connected(info),
            ClientEvent::Reattached(info) => Self::Reattached(info),
            ClientEvent::TransportLost => Self::TransportLost,
            ClientEvent::TunnelClosed { reason } => Self::TunnelClosed { reason },
            ClientEvent::ConnectFailed { server, result } => {
                let error = match result {
                    Some(code) => {
                        *last_failure = Some(format!("{} answered {code}", server.addr));
                        None
                    }
                    None => last_failure.clone(),
                };
                Self::ConnectFailed {
                    server,
                    result,
                    error,
                }
            }
            ClientEvent::NatDiscovered {
                public,
                varies_by_destination,
            } => Self::NatDiscovered {
                public,
                varies_by_destination,
            },
            ClientEvent::PeerTunnelUp {
                peer,
                path,
                setup,
                initiator,
                local_kind,
                remote_kind,
            } => Self::PeerTunnelUp {
                peer,
                path,
                setup,
                initiator,
                local_kind,
                remote_kind,
            },
            ClientEvent::PeerTunnelDown { peer, reason } => Self::PeerTunnelDown { peer, reason },
            ClientEvent::Terminated { reason } => Self::Terminated { reason },
            _ => return None,
        };
        Some(note)
    }
}
