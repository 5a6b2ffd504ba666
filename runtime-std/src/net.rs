//! The threads that move bytes: one per UDP socket, one acceptor per listener, and two per
//! stream (a reader that feeds the host, a writer that takes what the host queued).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;
use tscf_core::io::{
    ClientTls, Connect, Host, Input, RecvBuffers, Security, SocketId, StreamError, StreamId,
};
use tscf_core::wire::Transport;

use crate::drive::{Extra, Io, Shared, Slot};
use crate::stream::{self, StreamReader, StreamWriter};
use crate::udp::Udp;

/// How long a UDP thread waits for a datagram before it looks at the stop flag.
const UDP_POLL: Duration = Duration::from_millis(100);
/// Stack of stream threads; they hold a few small buffers on the heap only.
const STREAM_STACK: usize = 256 * 1024;

/// A UDP socket's thread: every datagram goes to the host, a few under one lock at first
/// ([`RecvBuffers::hand_over`]), until the socket is closed (or replaced) or the host stops.
pub(crate) fn run_udp<X: Extra>(shared: &Arc<Shared<X>>, socket: SocketId, sock: &Arc<Udp>) {
    let mut bufs = RecvBuffers::new();
    let mut meta = [RecvMeta::default(); RecvBuffers::MAX_SLOTS];
    loop {
        let filled = sock.recv(&mut bufs, &mut meta, UDP_POLL).unwrap_or(0);
        // A few under the lock first, then the rest in growing hand-overs: readers are
        // woken, and other threads get the tunnel, in between. An empty read (the poll timed
        // out) still checks for the end.
        let reads = meta[..filled].iter().map(|m| (m.addr, m.len, m.stride));
        let mut datagrams = bufs.received(reads).peekable();
        let mut handed = 0;
        loop {
            let mut state = shared.lock();
            let current = state
                .driver
                .sockets
                .get(&socket)
                .is_some_and(|s| Arc::ptr_eq(s, sock));
            if state.driver.stopped || !current {
                return;
            }
            let n = RecvBuffers::hand_over(handed);
            let behind = state.datagrams(Instant::now(), socket, datagrams.by_ref().take(n));
            handed += n;
            shared.woken(behind);
            drop(state);
            if datagrams.peek().is_none() {
                break;
            }
        }
        drop(datagrams);
        bufs.filled(filled);
    }
}

/// A listener's thread: each connection the host admits gets a thread of its own, which runs
/// the TLS handshake with `tls` (if any) and then the stream.
pub(crate) fn accept<X: Extra>(
    shared: &Arc<Shared<X>>,
    listener: &TcpListener,
    transport: Transport,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    for sock in listener.incoming() {
        let Ok(sock) = sock else {
            if shared.lock().driver.stopped {
                return;
            }
            // Out of descriptors or an aborted connection: let the system catch up.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let Ok(remote) = sock.peer_addr() else {
            continue;
        };
        let admitted = shared.drive(|host, io, now| {
            if io.stopped {
                return Err(true);
            }
            let stream = host.accept(now, transport, remote).ok_or(false)?;
            io.streams.insert(stream, Slot::new(sock.try_clone().ok()));
            Ok(stream)
        });
        let stream = match admitted {
            Ok(stream) => stream,
            Err(true) => return,
            Err(false) => continue,
        };
        let thread_shared = shared.clone();
        let tls = tls.clone();
        let spawned = thread::Builder::new()
            .name("tscf-stream".to_owned())
            .stack_size(STREAM_STACK)
            .spawn(move || accepted(&thread_shared, stream, sock, tls));
        if spawned.is_err() {
            report_closed(shared, stream, Some(StreamError::Io), None);
        }
    }
}

fn accepted<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    mut sock: TcpStream,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let _ = sock.set_nodelay(true);
    let mut verified_identity = false;
    let conn = match tls {
        None => None,
        Some(config) => {
            let conn = rustls::ServerConnection::new(config)
                .map_err(stream::StreamError::from)
                .and_then(|c| {
                    let mut conn = rustls::Connection::Server(c);
                    // The host cuts a handshake that is too slow: no deadline of our own.
                    let far = Instant::now() + Duration::from_secs(3600);
                    stream::handshake(&mut sock, &mut conn, far).map(|()| conn)
                });
            match conn {
                Ok(conn) => {
                    verified_identity = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                    Some(conn)
                }
                Err(e) => {
                    let detail = e.to_string();
                    return report_closed(
                        shared,
                        stream,
                        Some(StreamError::Handshake),
                        Some(&detail),
                    );
                }
            }
        }
    };
    open(shared, stream, sock, conn, verified_identity);
}

/// A TCP or TLS stream the host asked for: connects and handshakes within its bound, then
/// runs it.
pub(crate) fn connect<X: Extra>(shared: &Arc<Shared<X>>, connect: Connect) {
    let Connect {
        stream,
        to,
        timeout,
        ..
    } = connect;
    let deadline = Instant::now() + timeout;
    let tls = match connect.security {
        Security::Tls(tls) => Some(tls),
        Security::Tcp | Security::Quic(..) => None,
    };
    let mut sock = match TcpStream::connect_timeout(&to, timeout) {
        Ok(sock) => sock,
        Err(e) => {
            let detail = e.to_string();
            return report_closed(shared, stream, Some(StreamError::Connect), Some(&detail));
        }
    };
    let _ = sock.set_nodelay(true);
    // Register the socket so that a close from the host can cut the handshake.
    let wanted = {
        let mut state = shared.lock();
        match (state.driver.streams.get_mut(&stream), sock.try_clone()) {
            (Some(slot), Ok(clone)) if !slot.closing => {
                slot.sock = Some(clone);
                true
            }
            _ => false,
        }
    };
    if !wanted {
        let _ = sock.shutdown(Shutdown::Both);
        return report_closed(shared, stream, Some(StreamError::Connect), None);
    }
    let conn = match tls {
        None => None,
        Some(ClientTls { config, name }) => {
            let conn = rustls::ClientConnection::new(config, name)
                .map_err(stream::StreamError::from)
                .and_then(|c| {
                    let mut conn = rustls::Connection::Client(c);
                    stream::handshake(&mut sock, &mut conn, deadline).map(|()| conn)
                });
            match conn {
                Ok(conn) => Some(conn),
                Err(e) => {
                    let detail = e.to_string();
                    return report_closed(
                        shared,
                        stream,
                        Some(StreamError::Handshake),
                        Some(&detail),
                    );
                }
            }
        }
    };
    open(shared, stream, sock, conn, false);
}

/// Reports the stream open and runs it: a writer thread, and this thread reads.
fn open<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    sock: TcpStream,
    conn: Option<rustls::Connection>,
    verified_identity: bool,
) {
    let (reader, writer) = match stream::split(sock, conn) {
        Ok(halves) => halves,
        Err(_) => return report_closed(shared, stream, Some(StreamError::Io), None),
    };
    let ready = shared.drive(|host, io, now| {
        let ready = io.streams.get(&stream).map(|slot| slot.ready.clone());
        if ready.is_some() {
            let open = Input::StreamOpen {
                stream,
                verified_identity,
            };
            host.handle_input(now, open);
        }
        ready
    });
    let Some(ready) = ready else {
        return report_closed(shared, stream, Some(StreamError::Io), None);
    };
    let writer_shared = shared.clone();
    let spawned = thread::Builder::new()
        .name("tscf-stream-writer".to_owned())
        .stack_size(STREAM_STACK)
        .spawn(move || write_loop(&writer_shared, stream, writer, &ready));
    let error = match spawned {
        Ok(_) => read_loop(shared, stream, reader),
        Err(_) => Some(StreamError::Io),
    };
    report_closed(shared, stream, error, None);
}

/// Feeds what the stream reads to the host until it ends; the error, if it did not end
/// cleanly.
fn read_loop<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    mut reader: StreamReader,
) -> Option<StreamError> {
    loop {
        match reader.read() {
            Ok([]) => return None,
            Ok(data) => shared.drive(|host, _, now| {
                host.handle_input(now, Input::StreamData { stream, data });
            }),
            Err(_) => return Some(StreamError::Io),
        }
    }
}

/// The stream's writer thread: writes what the host queued, waits for more, and closes the
/// stream when the host closes it.
fn write_loop<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    mut writer: StreamWriter,
    ready: &std::sync::Condvar,
) {
    let mut out = Vec::new();
    loop {
        let mut state = shared.lock();
        loop {
            let took = state.host.take_output(Instant::now(), stream, &mut out);
            shared.woken(state.timer_behind());
            if took {
                break;
            }
            match state.driver.streams.get(&stream) {
                Some(slot) if !slot.closing && !state.driver.stopped => {
                    state = ready.wait(state).unwrap_or_else(|e| e.into_inner());
                }
                _ => {
                    drop(state);
                    writer.close();
                    return;
                }
            }
        }
        drop(state);
        if writer.send(&out).is_err() {
            // The reader sees the failure and reports the end.
            writer.close();
            return;
        }
    }
}

/// Reports the end of `stream` to the host and forgets its slot.
fn report_closed<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    error: Option<StreamError>,
    detail: Option<&str>,
) {
    shared.drive(|host, io, now| {
        if let Some(slot) = io.streams.remove(&stream) {
            slot.ready.notify_all();
        }
        host.handle_input(
            now,
            Input::StreamClosed {
                stream,
                error,
                detail,
            },
        );
    });
}

/// Wakes a listener's thread, blocked in `accept`, with a connection of our own (it then sees
/// the stop): to `addr`, or loopback for an unspecified address.
pub(crate) fn wake_acceptor(addr: SocketAddr) {
    let ip: IpAddr = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => Ipv4Addr::LOCALHOST.into(),
        IpAddr::V6(ip) if ip.is_unspecified() => Ipv6Addr::LOCALHOST.into(),
        ip => ip,
    };
    let _ = TcpStream::connect_timeout(
        &SocketAddr::new(ip, addr.port()),
        Duration::from_millis(200),
    );
}

impl<X: Extra> Io<X> {
    /// Adds `sock` as `socket` with its thread.
    pub(crate) fn add_socket(&mut self, socket: SocketId, sock: Udp) -> std::io::Result<()> {
        let shared = self.me.upgrade().ok_or(std::io::ErrorKind::NotConnected)?;
        let sock = Arc::new(sock);
        self.sockets.insert(socket, sock.clone());
        let spawned = thread::Builder::new()
            .name("tscf-udp".to_owned())
            .spawn(move || run_udp(&shared, socket, &sock));
        spawned.map(drop).inspect_err(|_| {
            self.sockets.remove(&socket);
        })
    }

    /// Starts connecting a stream in a thread of its own.
    pub(crate) fn connect(&mut self, connect: Connect) -> Result<(), String> {
        if let Security::Quic(..) = connect.security {
            return Err("QUIC is not supported by tscf-runtime-std".into());
        }
        let shared = self.me.upgrade().ok_or("stopping")?;
        let stream = connect.stream;
        thread::Builder::new()
            .name("tscf-stream".to_owned())
            .spawn(move || self::connect(&shared, connect))
            .map_err(|e| e.to_string())?;
        self.streams.insert(stream, Slot::new(None));
        Ok(())
    }
}
