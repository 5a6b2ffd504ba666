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
        Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0)
            .encode_envelope(&mut bytes)
            .unwrap();
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

    /// Writes `count` data envelopes, each an inner UDP packet from this tunnel to `dst`,
    /// in large writes.
    pub fn flood(&mut self, dst: &[Ipv4Addr], count: usize) {
        let mut bytes = Vec::new();
        for i in 0..count {
            let to = dst[i % dst.len()];
            let builder = etherparse::PacketBuilder::ipv4(self.ipv4.octets(), to.octets(), 64)
                .udp(5004, 5004);
            let mut packet = Vec::new();
            builder.write(&mut packet, &[0; 8]).unwrap();
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
    attacker.flood(&held, FLOOD);
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
