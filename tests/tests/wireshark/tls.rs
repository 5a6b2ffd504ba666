//! A TLS tunnel to a real server on loopback, captured live by tshark and decrypted with the
//! client's key log: the envelopes inside the TLS records must decode. The client is the
//! runtime's own TLS configuration (pinned fingerprint) with a key log added, speaking through
//! the core's encoder. Capturing needs root besides tshark.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use tscf_core::wire::{
    ControlKey, Envelope, EnvelopeType, InternalAddress, Message, MessageType, ResultCode,
};
use tscf_runtime_std::{tls, ClientTlsConfig, Server, ServerConfig};

use crate::capture::inner_ipv4_udp;
use crate::{skip, Tshark};

/// How long tshark may take to start capturing or to see a packet.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn a_captured_tls_tunnel_decrypts_to_tscf() {
    let Some(tshark) = Tshark::find() else { return };
    if !rustix::process::geteuid().is_root() {
        skip("capturing on the loopback interface needs root");
        return;
    }
    let server = Server::start(ServerConfig::loopback()).expect("server starts");
    let server_addr = server.local_addrs().tls[0];
    let file = tshark.dir().join("tls.pcapng");
    let filter = format!("tcp port {}", server_addr.port());
    let marker = UdpSocket::bind("127.0.0.1:0").unwrap();
    let Some(mut capture) = LiveCapture::start(&tshark, &filter, marker, &file) else {
        return;
    };

    let keylog = tshark.dir().join("keys.log");
    let fingerprint = server.tls_fingerprint().expect("TLS listener");
    let tunnel = run_tunnel(server_addr, fingerprint, &keylog);

    capture.stop();

    let keylog_option = format!("tls.keylog_file:{}", keylog.display());
    let packets = tshark.dissect(&file, &["-o", &keylog_option]);
    let tscf: Vec<_> = packets
        .iter()
        .enumerate()
        .filter(|(_, p)| p.has("tscftun"))
        .collect();
    assert!(!tscf.is_empty(), "nothing decrypted to tscf");
    for (i, p) in &tscf {
        assert!(
            p.protocols().contains(":tls:tscftun"),
            "frame {}: {}",
            i + 1,
            p.protocols()
        );
        assert!(p.experts().is_empty(), "frame {}\n{p}", i + 1);
    }
    let frame_of = |message_type: &str| {
        tscf.iter()
            .find(|(_, p)| p.all("tscftun.msg.type").contains(&message_type))
            .map(|(i, p)| (i + 1, *p))
            .unwrap_or_else(|| panic!("no message of type {message_type} decoded"))
    };
    let tunnel_id = format!("0x{:016x}", tunnel.id);

    let (request, _) = frame_of("0x01");
    let (_, response) = frame_of("0x02");
    assert_eq!(response.one("tscftun.msg.tunnel_id"), tunnel_id);
    assert_eq!(response.one("tscftun.result_code"), "0");
    assert_eq!(
        response.one("tscftun.internal_ipv4"),
        tunnel.internal.to_string()
    );
    assert_eq!(response.one("tscftun.request_in"), request.to_string());
    for message_type in ["0x07", "0x08", "0x03", "0x04"] {
        let (_, p) = frame_of(message_type);
        assert!(p.all("tscftun.msg.tunnel_id").contains(&tunnel_id.as_str()));
    }
    let (_, release_response) = frame_of("0x04");
    assert!(release_response.all("tscftun.result_code").contains(&"0"));
    let data = tscf
        .iter()
        .find(|(_, p)| p.all("tscftun.type").contains(&"0x04"))
        .map(|(_, p)| *p)
        .expect("the Data envelope decoded");
    assert!(data
        .all("ip.dst")
        .contains(&tunnel.internal.to_string().as_str()));
    assert!(data.all("udp.dstport").contains(&"5004"), "\n{data}");
}

/// What the server assigned.
struct Assigned {
    id: u64,
    internal: std::net::Ipv4Addr,
}

/// Configures a tunnel over TLS, sends a keepalive and one inner packet, and releases it.
fn run_tunnel(server: SocketAddr, fingerprint: tls::Fingerprint, keylog: &Path) -> Assigned {
    let mut config =
        (*tls::client_config(&ClientTlsConfig::pinned(fingerprint), tscf_runtime_std::OS).unwrap())
            .clone();
    config.key_log = Arc::new(KeyLogFile(Mutex::new(File::create(keylog).unwrap())));
    let tcp = TcpStream::connect(server).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::from(server.ip()))
        .expect("TLS client");
    let mut stream = rustls::StreamOwned::new(conn, tcp);

    let mut configuration = Message::new(MessageType::CONFIGURATION_REQUEST, 1, 0);
    configuration.tlvs.client_nonce = Some([1; 16]);
    send(&mut stream, &configuration, None);
    let bytes = receive(&mut stream, MessageType::CONFIGURATION_RESPONSE);
    let response = Message::decode(&bytes[3..]).expect("Configuration Response");
    assert_eq!(response.tlvs.result_code, Some(ResultCode::SUCCESS));
    let InternalAddress { addr: internal, .. } = response.tlvs.internal_ipv4.expect("IPv4");
    let id = response.header.tunnel_id;
    let key = ControlKey::new(&response.tlvs.control_key.expect("the tunnel's key"));

    let keepalive = Message::new(MessageType::KEEPALIVE, 2, id);
    send(&mut stream, &keepalive, Some(&key));
    receive(&mut stream, MessageType::KEEPALIVE_RESPONSE);

    // To the tunnel's own address: the server relays it back.
    let inner = inner_ipv4_udp(
        std::net::SocketAddrV4::new(internal, 5004),
        std::net::SocketAddrV4::new(internal, 5004),
        b"inner",
    );
    let mut envelope = Vec::new();
    Envelope::encode(EnvelopeType::DATA, &inner, &mut envelope).unwrap();
    stream.write_all(&envelope).unwrap();

    let mut release = Message::new(MessageType::CONFIGURATION_RELEASE_REQUEST, 3, id);
    release.tlvs.result_code = Some(ResultCode::SUCCESS);
    send(&mut stream, &release, Some(&key));
    receive(&mut stream, MessageType::CONFIGURATION_RELEASE_RESPONSE);
    stream.conn.send_close_notify();
    stream.flush().unwrap();
    Assigned { id, internal }
}

/// Sends `message`, signed as the tunnel's client when `key` is given.
fn send(stream: &mut impl Write, message: &Message<'_>, key: Option<&ControlKey>) {
    let mut out = Vec::new();
    match key {
        Some(key) => message
            .encode_envelope_with_integrity(&key.client_to_director(), &mut out)
            .unwrap(),
        None => message.encode_envelope(&mut out).unwrap(),
    }
    stream.write_all(&out).unwrap();
}

/// Reads envelopes until a control message of `message_type`; returns that envelope.
fn receive(stream: &mut impl Read, message_type: MessageType) -> Vec<u8> {
    loop {
        let mut envelope = vec![0u8; 3];
        stream.read_exact(&mut envelope).expect("an envelope");
        let len = usize::from(u16::from_be_bytes([envelope[1], envelope[2]]));
        envelope.resize(len, 0);
        stream.read_exact(&mut envelope[3..]).expect("an envelope");
        let decoded = Envelope::decode_datagram(&envelope).expect("envelope");
        if decoded.kind == EnvelopeType::CONTROL && decoded.payload.get(1) == Some(&message_type.0)
        {
            return envelope;
        }
    }
}

/// Writes TLS secrets in the NSS key log format Wireshark reads.
#[derive(Debug)]
struct KeyLogFile(Mutex<File>);

impl rustls::KeyLog for KeyLogFile {
    fn log(&self, label: &str, client_random: &[u8], secret: &[u8]) {
        let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
        let mut file = self.0.lock().unwrap();
        writeln!(file, "{label} {} {}", hex(client_random), hex(secret)).unwrap();
    }
}

/// tshark capturing on `lo` into a file, printing a line per packet. Datagrams a socket sends
/// to itself mark the start and the end: a packet line for them shows that tshark has what
/// came before.
struct LiveCapture {
    child: Child,
    stdout: Receiver<String>,
    stderr: Receiver<String>,
    marker: UdpSocket,
}

impl LiveCapture {
    /// Starts capturing packets that match `filter` or go to `marker`, and waits until a
    /// marker shows; `None` (after [`skip`]) if tshark cannot capture here.
    fn start(tshark: &Tshark, filter: &str, marker: UdpSocket, file: &PathBuf) -> Option<Self> {
        let port = marker.local_addr().unwrap().port();
        let mut child = tshark
            .command()
            .args(["-i", "lo", "-P", "-l", "-f"])
            .arg(format!("({filter}) or udp port {port}"))
            .arg("-w")
            .arg(file)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tshark starts");
        let stdout = lines(child.stdout.take().unwrap());
        let stderr = lines(child.stderr.take().unwrap());
        let capture = Self {
            child,
            stdout,
            stderr,
            marker,
        };
        // tshark says it captures before the interface is open: send markers until one shows.
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        while Instant::now() < deadline {
            capture.send_marker(b"ready");
            match capture.wait_for_marker(b"ready", Duration::from_millis(250)) {
                Ok(true) => return Some(capture),
                Ok(false) => {}
                Err(()) => break,
            }
        }
        let said: Vec<String> = capture.stderr.try_iter().collect();
        skip(&format!(
            "tshark does not capture on lo: {}",
            said.join(" / ")
        ));
        None
    }

    /// Marks the end, waits until the mark shows, then stops the capture (SIGINT, so that the
    /// file is complete) and waits for tshark to exit.
    fn stop(&mut self) {
        self.send_marker(b"done");
        assert_eq!(
            self.wait_for_marker(b"done", CAPTURE_TIMEOUT),
            Ok(true),
            "tshark did not show the end marker"
        );
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).expect("a pid");
        rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
        // Its output ends when it exits.
        let deadline = Instant::now() + CAPTURE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!("tshark did not stop on SIGINT"),
            }
        }
        let status = self.child.wait().expect("tshark exits");
        assert!(status.success(), "tshark capture ended with {status}");
    }

    fn send_marker(&self, payload: &[u8]) {
        let to = self.marker.local_addr().unwrap();
        self.marker.send_to(payload, to).unwrap();
    }

    /// Whether the packet line of a marker with `payload` shows within `timeout`; `Err` if
    /// tshark is gone.
    fn wait_for_marker(&self, payload: &[u8], timeout: Duration) -> Result<bool, ()> {
        let port = self.marker.local_addr().unwrap().port();
        let line_end = format!("{port} Len={}", payload.len());
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) if line.trim_end().ends_with(&line_end) => return Ok(true),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Ok(false),
                Err(RecvTimeoutError::Disconnected) => return Err(()),
            }
        }
    }
}

impl Drop for LiveCapture {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The lines of a pipe, read on a thread of their own.
fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
