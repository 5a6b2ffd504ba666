//! Attacks on a live smol server, each reproduced as an attacker would run it: the server
//! stays bounded and other clients keep their service.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use tscf_core::wire::{
    Envelope, EnvelopeType, Message, MessageType, ResultCode, StreamDeframer, Transport,
};

use crate::bad_input::eventually;
use crate::util::{server_config, smol_flow, smol_tunnel, tunnel_config};

/// A client that speaks the wire format by hand over plain TCP.
pub struct RawClient {
    sock: TcpStream,
    deframer: StreamDeframer,
    /// The internal address it was given.
    pub ipv4: Ipv4Addr,
}

impl RawClient {
    /// Connects to `addr` and configures a tunnel.
    pub fn configure(addr: SocketAddr) -> Self {
        let sock = TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut client = Self {
            sock,
            deframer: StreamDeframer::new(),
            ipv4: Ipv4Addr::UNSPECIFIED,
        };
        let mut bytes = Vec::new();
        let mut request = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
        request.tlvs.client_nonce = Some(*b"raw client nonce");
        request.encode_envelope(&mut bytes).unwrap();
        client.sock.write_all(&bytes).unwrap();
        let answer = client.next_control();
        let message = Message::decode(&answer).unwrap();
        assert_eq!(message.tlvs.result_code, Some(ResultCode::SUCCESS));
        client.ipv4 = message.tlvs.internal_ipv4.unwrap().addr;
        client
    }

    /// The payload of the next control envelope.
    fn next_control(&mut self) -> Vec<u8> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(env) = self.deframer.next_envelope().unwrap() {
                if env.kind == EnvelopeType::CONTROL {
                    return env.payload.to_vec();
                }
                continue;
            }
            let n = self.sock.read(&mut buf).unwrap();
            assert!(n > 0, "closed by the server");
            self.deframer.push(&buf[..n]).unwrap();
        }
    }

    /// Writes `count` data envelopes, each an inner UDP packet of `size` octets of payload
    /// from this tunnel to `dst`, in large writes.
    pub fn flood(&mut self, dst: &[Ipv4Addr], count: usize, size: usize) {
        let mut bytes = Vec::new();
        for i in 0..count {
            let to = dst[i % dst.len()];
            let builder = etherparse::PacketBuilder::ipv4(self.ipv4.octets(), to.octets(), 64)
                .udp(5004, 5004);
            let mut packet = Vec::new();
            builder.write(&mut packet, &vec![0; size]).unwrap();
            Envelope::encode(EnvelopeType::DATA, &packet, &mut bytes).unwrap();
            if bytes.len() > 60_000 {
                self.sock.write_all(&bytes).unwrap();
                bytes.clear();
            }
        }
        self.sock.write_all(&bytes).unwrap();
    }
}

/// 256 tunnels configured over TCP and left persistent (the connection closed), then about
/// 2.6 MB of small packets to them: the frames held for persistent tunnels used to fill the
/// global queue, and an innocent pair then got nothing through.
#[test]
fn persistent_tunnels_flooded_do_not_stop_relaying() {
    let server = smol::block_on(tscf_runtime_smol::Server::start(server_config())).unwrap();
    let addrs = server.local_addrs().clone();
    let held: Vec<Ipv4Addr> = (0..256)
        .map(|_| RawClient::configure(addrs.tcp[0]).ipv4)
        .collect();
    eventually("256 persistent tunnels", || {
        server.stats().director.persistent_tunnels == 256
    });

    let mut attacker = RawClient::configure(addrs.tcp[0]);
    const FLOOD: usize = 70_000;
    let before = server.stats().director.frames_relayed;
    attacker.flood(&held, FLOOD, 8);
    eventually("the flood is read", || {
        let d = server.stats().director;
        let dropped = d.dropped.held_full + d.dropped.queue_full;
        d.frames_relayed - before + dropped == FLOOD as u64
    });
    let stats = server.stats().director;
    assert_eq!(stats.dropped.queue_full, 0, "{stats:?}");

    let config = tunnel_config(&addrs, server.tls_fingerprint(), Transport::UDP);
    let got = smol::block_on(async {
        let a = smol_tunnel(config.clone()).await;
        let b = smol_tunnel(config).await;
        smol_flow(&a, &b, 20, false).await
    });
    assert!(got.len() >= 15, "an innocent pair got {} of 20", got.len());
}

/// A TCP connection to `to` from `source` (any port): attackers on loopback come from
/// addresses of their own, as they would from other hosts.
pub fn tcp_from(source: Ipv4Addr, to: SocketAddr) -> std::io::Result<TcpStream> {
    use rustix::net::{bind, connect, socket, AddressFamily, SocketType};
    let fd = socket(AddressFamily::INET, SocketType::STREAM, None)?;
    bind(&fd, &SocketAddr::new(source.into(), 0))?;
    connect(&fd, &to)?;
    Ok(TcpStream::from(fd))
}

/// Shrinks the receive buffer of `sock`, so that a reader that stops blocks its writer soon.
fn small_receive_buffer(sock: &TcpStream) {
    rustix::net::sockopt::set_socket_recv_buffer_size(sock, 4096).unwrap();
}

/// A server of either runtime with a short stream write deadline.
enum AnyServer {
    Smol(tscf_runtime_smol::ServerHandle),
    Std(tscf_runtime_std::ServerHandle),
}

impl AnyServer {
    fn start(smol: bool, config: tscf_runtime_smol::ServerConfig) -> Self {
        if smol {
            Self::Smol(smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap())
        } else {
            let mut config = config;
            config.quic.clear();
            Self::Std(tscf_runtime_std::Server::start(config).unwrap())
        }
    }

    fn control(&self) -> &dyn tscf_core::server::ServerControl {
        match self {
            Self::Smol(s) => &**s,
            Self::Std(s) => &**s,
        }
    }

    fn tcp(&self) -> SocketAddr {
        match self {
            Self::Smol(s) => s.local_addrs().tcp[0],
            Self::Std(s) => s.local_addrs().tcp[0],
        }
    }
}

/// A TCP client that configures its tunnel and then never reads, while another client sends
/// it more than the server may queue: its writer blocks. The connection used to keep its
/// slot for good; now the write deadline cuts it and the slot is free again.
fn never_reading_client_loses_its_slot(smol: bool) {
    let mut config = server_config();
    config.stream_write_timeout = Duration::from_millis(500);
    let server = AnyServer::start(smol, config);
    let control = server.control();

    let victim = RawClient::configure(server.tcp());
    small_receive_buffer(&victim.sock);
    let mut sender = RawClient::configure(server.tcp());
    assert_eq!(control.stats().stream_connections, 2);
    // 12 MB towards a reader that reads nothing: more than the socket buffers hold.
    sender.flood(&[victim.ipv4], 12_000, 1000);
    eventually("the stalled writer is cut", || {
        let stats = control.stats();
        stats.transport.stream_write_timeouts == 1 && stats.stream_connections == 1
    });
    assert_eq!(control.stats().director.persistent_tunnels, 1);
}

#[test]
fn never_reading_tcp_client_loses_its_slot_smol() {
    never_reading_client_loses_its_slot(true);
}

#[test]
fn never_reading_tcp_client_loses_its_slot_std() {
    never_reading_client_loses_its_slot(false);
}

/// Idle connections to the TLS port, from one source and then from many: a source holds at
/// most its bound of unconfigured connections, and once the server is full the oldest idle
/// ones give their slots to new clients. 1,500 such connections used to lock every TLS and
/// QUIC client out.
#[test]
fn idle_connections_do_not_lock_clients_out() {
    let mut config = server_config();
    config.max_stream_connections = 64;
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    let addrs = server.local_addrs().clone();
    let one_source = Ipv4Addr::new(127, 0, 0, 2);
    let mut idle = Vec::new();
    for _ in 0..100 {
        // The server may close the ones beyond the bound at once.
        if let Ok(sock) = tcp_from(one_source, addrs.tls[0]) {
            idle.push(sock);
        }
    }
    eventually("one source holds 16", || {
        let stats = server.stats();
        stats.transport.streams_refused_per_source == 84 && stats.stream_connections == 16
    });
    for source in 3..20u8 {
        for _ in 0..16 {
            if let Ok(sock) = tcp_from(Ipv4Addr::new(127, 0, 0, source), addrs.tls[0]) {
                idle.push(sock);
            }
        }
    }
    eventually("the server is full of idle connections", || {
        server.stats().stream_connections >= 64
    });
    for transport in [Transport::TLS, Transport::QUIC] {
        let mut config = tunnel_config(&addrs, server.tls_fingerprint(), transport);
        config.connect_timeout = Duration::from_secs(5);
        let tunnel = smol::block_on(tscf_runtime_smol::Tunnel::connect(config));
        assert!(tunnel.is_ok(), "{transport}: {:?}", tunnel.err());
    }
    assert!(server.stats().transport.streams_evicted >= 2);
}

/// Waits up to `limit` for `check` to hold.
fn within(limit: Duration, what: &str, check: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A raw QUIC client of `server` with `transport`'s parameters, connected.
async fn quic_client(
    server: &tscf_runtime_smol::ServerHandle,
    transport: quinn::TransportConfig,
) -> (quinn::Endpoint, quinn::Connection) {
    let pinned = tscf_runtime_smol::tls::ClientTlsConfig::pinned(server.tls_fingerprint().unwrap());
    let mut tls =
        (*tscf_runtime_smol::tls::client_config(&pinned, tscf_runtime_smol::OS).unwrap()).clone();
    tls.alpn_protocols = vec![b"tscf".to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut config = quinn::ClientConfig::new(std::sync::Arc::new(crypto));
    config.transport_config(std::sync::Arc::new(transport));
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = endpoint
        .connect_with(config, server.local_addrs().quic[0], "127.0.0.1")
        .unwrap()
        .await
        .unwrap();
    (endpoint, conn)
}

/// Configures a tunnel on the stream of `conn`; its internal address.
async fn configure_quic(
    conn: &quinn::Connection,
) -> (quinn::SendStream, quinn::RecvStream, Ipv4Addr) {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut request = Vec::new();
    let mut message = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    message.tlvs.client_nonce = Some(*b"raw client nonce");
    message.encode_envelope(&mut request).unwrap();
    send.write_all(&request).await.unwrap();
    let mut deframer = StreamDeframer::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(env) = deframer.next_envelope().unwrap() {
            let message = Message::decode(env.payload).unwrap();
            let ip = message.tlvs.internal_ipv4.unwrap().addr;
            return (send, recv, ip);
        }
        let n = recv.read(&mut chunk).await.unwrap().unwrap();
        deframer.push(&chunk[..n]).unwrap();
    }
}

/// The server's QUIC transport parameters let a client open its tunnel's one stream and no
/// other: quinn's defaults (100 bidirectional and 100 unidirectional streams of 1.25 MB
/// each) let one connection make the server buffer about 250 MB.
#[test]
fn quic_client_cannot_open_more_streams_than_its_tunnel() {
    let server = smol::block_on(tscf_runtime_smol::Server::start(server_config())).unwrap();
    smol::block_on(async {
        let (_endpoint, conn) = quic_client(&server, quinn::TransportConfig::default()).await;
        let (mut send, _recv, _) = configure_quic(&conn).await;
        let second = futures_lite::future::poll_once(conn.open_bi()).await;
        assert!(
            second.is_none(),
            "a second bidirectional stream was granted"
        );
        let uni = futures_lite::future::poll_once(conn.open_uni()).await;
        assert!(uni.is_none(), "a unidirectional stream was granted");
        // What the server takes on the stream ahead of reading it: two maximal envelopes.
        let flood = vec![0u8; 200_000];
        let written = futures_lite::future::poll_once(send.write(&flood)).await;
        let credit = written.map(|w| w.unwrap()).unwrap_or(0);
        assert!(credit <= 131_070, "{credit} octets of credit");
    });
}

/// A QUIC client that grants the server a few octets of stream credit and then reads
/// nothing, while keeping its connection alive: the server's writer waits for credit that
/// never comes. It used to keep its slot for good; the write deadline now cuts it.
#[test]
fn quic_client_granting_no_credit_loses_its_slot() {
    let mut config = server_config();
    config.stream_write_timeout = Duration::from_millis(500);
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    let tcp = server.local_addrs().tcp[0];
    smol::block_on(async {
        let mut transport = quinn::TransportConfig::default();
        transport
            .stream_receive_window(1024u32.into())
            .datagram_receive_buffer_size(None)
            .keep_alive_interval(Some(Duration::from_millis(100)));
        let (_endpoint, conn) = quic_client(&server, transport).await;
        let (_send, _recv, victim) = configure_quic(&conn).await;
        let mut sender = RawClient::configure(tcp);
        assert_eq!(server.stats().stream_connections, 2);
        // 3 MB: more than the connection's send window and the stream's queue.
        sender.flood(&[victim], 3000, 1000);
        within(
            Duration::from_secs(5),
            "the stalled QUIC writer is cut",
            || {
                let stats = server.stats();
                stats.transport.stream_write_timeouts == 1 && stats.stream_connections == 1
            },
        );
        drop(conn);
    });
}

/// QUIC connections that finish their handshake and never open a stream: they used to hold
/// their slots past every timeout while the server reported no pending connection. Now they
/// are pending connections of the director, closed at its pending timeout.
#[test]
fn quic_connections_without_a_stream_are_reclaimed() {
    let mut config = server_config();
    config.director.pending_timeout = Duration::from_millis(500);
    let server = smol::block_on(tscf_runtime_smol::Server::start(config)).unwrap();
    smol::block_on(async {
        let mut idle = Vec::new();
        // As many as one source may hold unconfigured.
        for _ in 0..16 {
            idle.push(quic_client(&server, quinn::TransportConfig::default()).await);
        }
        within(Duration::from_secs(5), "16 pending connections", || {
            server.stats().director.pending_connections == 16
        });
        within(
            Duration::from_secs(5),
            "idle QUIC connections closed",
            || server.stats().stream_connections == 0,
        );
        for (_, conn) in &idle {
            let closed = futures_lite::future::or(async { Some(conn.closed().await) }, async {
                smol::Timer::after(Duration::from_secs(5)).await;
                None
            });
            assert!(closed.await.is_some(), "the server closed it");
        }
    });
}
