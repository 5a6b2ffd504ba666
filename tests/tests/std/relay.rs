//! A UDP relay between tunnel clients and a server, as a NAT and an attacker on the path see
//! them: each client address gets an upstream socket of its own (its mapping), which the test
//! can replace (a NAT rebinding) or pause; datagrams can be sent to a client from the relay's
//! front address, which the client takes for the server's (what an off-path attacker that
//! spoofs the server's address achieves); and everything the clients send is logged.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tscf_core::client::ServerEndpoint;
use tscf_core::wire::{Envelope, EnvelopeType, Message, Transport};

/// How often the relay's threads look at the stop flag.
const POLL: Duration = Duration::from_millis(50);

pub struct UdpRelay {
    front: Arc<UdpSocket>,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

#[derive(Default)]
struct State {
    server: Option<SocketAddr>,
    /// Client address → its upstream socket and whether it still carries traffic.
    upstreams: HashMap<SocketAddr, Upstream>,
    /// Clients whose datagrams to the server are dropped.
    paused: Vec<SocketAddr>,
    /// Every datagram a client sent, in order.
    sent: Vec<(SocketAddr, Vec<u8>)>,
    /// Every datagram the server sent to a client, in order.
    received: Vec<(SocketAddr, Vec<u8>)>,
}

#[derive(Clone)]
struct Upstream {
    socket: Arc<UdpSocket>,
    alive: Arc<AtomicBool>,
}

impl UdpRelay {
    /// A relay on 127.0.0.1 to `server`.
    pub fn new(server: SocketAddr) -> Arc<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        front.set_read_timeout(Some(POLL)).unwrap();
        let relay = Arc::new(Self {
            front,
            state: Arc::new(Mutex::new(State {
                server: Some(server),
                ..State::default()
            })),
            stop: Arc::new(AtomicBool::new(false)),
            threads: Mutex::new(Vec::new()),
        });
        let r = relay.clone();
        let handle = thread::spawn(move || r.run_front());
        relay.threads.lock().unwrap().push(handle);
        relay
    }

    /// The server as a client configured for the relay sees it.
    pub fn endpoint(&self) -> ServerEndpoint {
        ServerEndpoint {
            addr: self.front.local_addr().unwrap(),
            transport: Transport::UDP,
        }
    }

    /// Where the relay forwards to from now on.
    pub fn set_server(&self, server: SocketAddr) {
        self.state.lock().unwrap().server = Some(server);
    }

    /// The clients that have sent through the relay, in no particular order.
    pub fn clients(&self) -> Vec<SocketAddr> {
        self.state
            .lock()
            .unwrap()
            .upstreams
            .keys()
            .copied()
            .collect()
    }

    /// The address the server sees for `client` now.
    pub fn mapped(&self, client: SocketAddr) -> Option<SocketAddr> {
        let state = self.state.lock().unwrap();
        let up = state.upstreams.get(&client)?;
        up.socket.local_addr().ok()
    }

    /// A NAT rebinding: `client`'s traffic leaves from a new port, and what the server sends
    /// to the old one is lost.
    pub fn rebind(self: &Arc<Self>, client: SocketAddr) {
        let mut state = self.state.lock().unwrap();
        if let Some(old) = state.upstreams.remove(&client) {
            old.alive.store(false, Ordering::Relaxed);
        }
        let up = self.upstream(client);
        state.upstreams.insert(client, up);
    }

    /// Drops what `client` sends to the server while `paused`.
    pub fn pause(&self, client: SocketAddr, paused: bool) {
        let mut state = self.state.lock().unwrap();
        state.paused.retain(|c| *c != client);
        if paused {
            state.paused.push(client);
        }
    }

    /// Sends `datagram` to `client` from the relay's front address: for the client, from the
    /// server.
    pub fn send_to_client(&self, client: SocketAddr, datagram: &[u8]) {
        self.front.send_to(datagram, client).unwrap();
    }

    /// Every control message a client (`client`, or any) sent so far, as whole envelopes,
    /// with the client's address.
    pub fn control_sent(&self, client: Option<SocketAddr>) -> Vec<(SocketAddr, Vec<u8>)> {
        let state = self.state.lock().unwrap();
        state
            .sent
            .iter()
            .filter(|(from, d)| {
                client.is_none_or(|c| c == *from) && d.first() == Some(&EnvelopeType::CONTROL.0)
            })
            .cloned()
            .collect()
    }

    /// Every control message the server sent to a client (`client`, or any) through the
    /// relay so far, as whole envelopes, with the client's address.
    pub fn control_received(&self, client: Option<SocketAddr>) -> Vec<(SocketAddr, Vec<u8>)> {
        let state = self.state.lock().unwrap();
        state
            .received
            .iter()
            .filter(|(to, d)| {
                client.is_none_or(|c| c == *to) && d.first() == Some(&EnvelopeType::CONTROL.0)
            })
            .cloned()
            .collect()
    }

    /// Waits (up to 10 s) for a control envelope from a client (`client`, or any) that `pick`
    /// accepts, the latest such, and returns it with the client's address.
    pub fn wait_for_control(
        &self,
        client: Option<SocketAddr>,
        mut pick: impl FnMut(&Message<'_>) -> bool,
    ) -> (SocketAddr, Vec<u8>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let found = self
                .control_sent(client)
                .into_iter()
                .rev()
                .find(|(_, d)| message(d).is_some_and(|m| pick(&m)));
            if let Some(d) = found {
                return d;
            }
            assert!(Instant::now() < deadline, "no such message from {client:?}");
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn run_front(self: Arc<Self>) {
        let mut buf = [0u8; 65_536];
        while !self.stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = self.front.recv_from(&mut buf) else {
                continue;
            };
            let mut state = self.state.lock().unwrap();
            state.sent.push((from, buf[..n].to_vec()));
            if state.paused.contains(&from) {
                continue;
            }
            let up = match state.upstreams.get(&from) {
                Some(up) => up.clone(),
                None => {
                    let up = self.upstream(from);
                    state.upstreams.insert(from, up.clone());
                    up
                }
            };
            if let Some(server) = state.server {
                let _ = up.socket.send_to(&buf[..n], server);
            }
        }
    }

    /// A new upstream socket for `client`, with a thread that forwards what comes back.
    fn upstream(self: &Arc<Self>, client: SocketAddr) -> Upstream {
        let socket = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        socket.set_read_timeout(Some(POLL)).unwrap();
        let up = Upstream {
            socket: socket.clone(),
            alive: Arc::new(AtomicBool::new(true)),
        };
        let (relay, alive) = (self.clone(), up.alive.clone());
        let handle = thread::spawn(move || {
            let mut buf = [0u8; 65_536];
            while alive.load(Ordering::Relaxed) && !relay.stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    if alive.load(Ordering::Relaxed) {
                        let mut state = relay.state.lock().unwrap();
                        state.received.push((client, buf[..n].to_vec()));
                        let _ = relay.front.send_to(&buf[..n], client);
                    }
                }
            }
        });
        self.threads.lock().unwrap().push(handle);
        up
    }

    /// Stops every thread (they hold the relay, so dropping it alone would not).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        let threads = std::mem::take(&mut *self.threads.lock().unwrap());
        for t in threads {
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

/// The control message in a whole envelope, if it is one and decodes.
pub fn message(envelope: &[u8]) -> Option<Message<'_>> {
    let envelope = Envelope::decode_datagram(envelope).ok()?;
    (envelope.kind == EnvelopeType::CONTROL)
        .then(|| Message::decode(envelope.payload).ok())
        .flatten()
}
