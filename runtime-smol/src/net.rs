//! The tasks that move bytes: one per UDP socket, one acceptor per listener, and one per TCP
//! or TLS stream, which reads and writes.

use std::future::Future;
use std::io;
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_io::{Async, Timer};
use futures_lite::future;
use futures_lite::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use futures_rustls::{TlsAcceptor, TlsConnector};
use quinn_udp::RecvMeta;
use tscf_core::io::{
    ClientTls, Connect, Host, Input, RecvBuffers, Security, SocketId, StreamError, StreamId,
};
use tscf_core::wire::Transport;

use crate::drive::{Extra, Io, Shared, Slot};
use crate::udp::Udp;

/// Octets read at a time while a stream is quiet: what an idle connection holds.
const READ_SMALL: usize = 2 * 1024;
/// Octets read at a time while reads fill the buffer (a busy connection).
const READ_LARGE: usize = 16 * 1024;

/// A UDP socket's task: every datagram goes to the host, a few under one lock at first
/// ([`RecvBuffers::hand_over`]). It ends when the host closes the socket (its task is dropped
/// with it) or stops.
pub(crate) async fn run_udp<X: Extra>(shared: &Arc<Shared<X>>, socket: SocketId, sock: &Udp) {
    let mut bufs = RecvBuffers::new();
    let mut meta = [RecvMeta::default(); RecvBuffers::MAX_SLOTS];
    loop {
        let Ok(filled) = sock.recv(&mut bufs, &mut meta).await else {
            continue;
        };
        let reads = || meta[..filled].iter().map(|m| (m.addr, m.len, m.stride));
        // A few first, then the rest in growing hand-overs, with the application's tasks
        // running in between.
        let (mut handed, count) = (0, bufs.received(reads()).count());
        while handed < count {
            if handed > 0 {
                future::yield_now().await;
            }
            let mut state = shared.lock();
            if state.driver.stopped {
                return;
            }
            let n = RecvBuffers::hand_over(handed);
            let datagrams = bufs.received(reads()).skip(handed).take(n);
            shared.woken(state.datagrams(Instant::now(), socket, datagrams));
            handed += n;
        }
        bufs.filled(filled);
    }
}

/// A listener's task: each connection the host admits gets a task of its own, which runs the
/// TLS handshake with `tls` (if any) and then the stream.
pub(crate) async fn accept<X: Extra>(
    shared: Arc<Shared<X>>,
    listener: Async<TcpListener>,
    transport: Transport,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let admit = move |host: &mut X::Host, now, remote| host.accept(now, transport, remote);
    accept_with(shared, listener, tls, admit).await;
}

/// A listener's task whose connections the host admits with `admit` (a stream id, or `None`
/// to close it at once).
pub(crate) async fn accept_with<X: Extra>(
    shared: Arc<Shared<X>>,
    listener: Async<TcpListener>,
    tls: Option<Arc<rustls::ServerConfig>>,
    admit: impl Fn(&mut X::Host, Instant, std::net::SocketAddr) -> Option<StreamId>,
) {
    loop {
        let Ok((sock, remote)) = listener.accept().await else {
            // Out of descriptors or an aborted connection: let the system catch up.
            Timer::after(Duration::from_millis(10)).await;
            continue;
        };
        let stream = shared.drive(|host, io, now| {
            if io.stopped {
                return None;
            }
            let stream = admit(host, now, remote)?;
            io.streams.insert(stream, Slot::default());
            Some(stream)
        });
        let Some(stream) = stream else {
            continue;
        };
        let shared = shared.clone();
        let tls = tls.clone();
        smol::spawn(async move {
            let error = accepted(&shared, stream, sock, tls).await;
            closed(&shared, stream, error);
        })
        .detach();
    }
}

async fn accepted<X: Extra>(
    shared: &Arc<Shared<X>>,
    stream: StreamId,
    sock: Async<TcpStream>,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> Ended {
    let _ = sock.get_ref().set_nodelay(true);
    let Some(config) = tls else {
        opened(shared, stream, false);
        return serve(shared, stream, sock).await;
    };
    // The host cuts a handshake that is too slow: no deadline of our own.
    match abortable(shared, stream, TlsAcceptor::from(config).accept(sock)).await {
        Some(Ok(tls)) => {
            let verified = tls
                .get_ref()
                .1
                .peer_certificates()
                .is_some_and(|c| !c.is_empty());
            opened(shared, stream, verified);
            serve(shared, stream, tls).await
        }
        Some(Err(e)) => failed(StreamError::Handshake, e),
        None => failed(StreamError::Handshake, "cut"),
    }
}

/// A TCP or TLS stream the host asked for: connects and handshakes within its bound, then
/// runs it.
pub(crate) async fn connect<X: Extra>(shared: &Arc<Shared<X>>, connect: Connect) {
    let Connect { stream, to, .. } = connect;
    let deadline = Instant::now() + connect.timeout;
    let tls = match connect.security {
        Security::Tls(tls) => Some(tls),
        Security::Tcp | Security::Quic(..) => None,
    };
    let error = async {
        let sock = match bounded(deadline, Async::<TcpStream>::connect(to)).await {
            Ok(sock) => sock,
            Err(e) => return failed(StreamError::Connect, e),
        };
        let _ = sock.get_ref().set_nodelay(true);
        let Some(ClientTls { config, name }) = tls else {
            opened(shared, stream, false);
            return serve(shared, stream, sock).await;
        };
        let handshake = bounded(deadline, TlsConnector::from(config).connect(name, sock));
        match abortable(shared, stream, handshake).await {
            Some(Ok(tls)) => {
                opened(shared, stream, false);
                serve(shared, stream, tls).await
            }
            Some(Err(e)) => failed(StreamError::Handshake, describe(&e)),
            None => failed(StreamError::Handshake, "cut"),
        }
    }
    .await;
    closed(shared, stream, error);
}

/// What a stream's task does next.
pub(crate) enum Next {
    Write,
    Idle,
    Close,
    Abort,
}

/// Takes what waits for `stream` into `out` and says what to do with it.
pub(crate) fn next<X: Extra>(shared: &Shared<X>, stream: StreamId, out: &mut Vec<u8>) -> Next {
    let mut state = shared.lock();
    let stopped = state.driver.stopped;
    let Some(slot) = state.driver.streams.get_mut(&stream) else {
        return Next::Abort;
    };
    if slot.abort || stopped {
        return Next::Abort;
    }
    let closing = slot.closing;
    let took = state.host.take_output(Instant::now(), stream, out);
    shared.woken(state.timer_behind());
    match (took, closing) {
        (true, _) => Next::Write,
        (false, true) => Next::Close,
        (false, false) => Next::Idle,
    }
}

/// Runs a connected stream: writes what the host queues, feeds what it reads, until either
/// side closes it. Its error, if it did not end cleanly.
async fn serve<X: Extra, S>(shared: &Arc<Shared<X>>, stream: StreamId, mut io: S) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // A stream the host already forgot has nothing to serve.
    let wake = shared
        .lock()
        .driver
        .streams
        .get(&stream)
        .map(|s| s.wake.clone())?;
    let mut chunk = vec![0u8; READ_SMALL];
    let mut out = Vec::new();
    loop {
        // Listen before looking, so that a wake-up in between is not lost.
        let woken = wake.listen();
        match next(shared, stream, &mut out) {
            Next::Abort => return failed(StreamError::Io, "cut"),
            Next::Close => {
                let _ = io.close().await;
                return None;
            }
            Next::Write => {
                let write = async { io.write_all(&out).await.and(io.flush().await) };
                match abortable(shared, stream, write).await {
                    Some(Ok(())) => continue,
                    Some(Err(e)) => return failed(StreamError::Io, e),
                    None => return failed(StreamError::Io, "cut"),
                }
            }
            Next::Idle => {}
        }
        let read = future::or(async { Some(io.read(&mut chunk).await) }, async {
            woken.await;
            None
        })
        .await;
        match read {
            None => {}
            Some(Ok(0)) => return None,
            Some(Ok(n)) => {
                let data = &chunk[..n];
                shared.drive(|host, _, now| {
                    host.handle_input(now, Input::StreamData { stream, data });
                });
                // Grow while reads fill the buffer; give it back once they no longer do.
                if n == chunk.len() && chunk.len() < READ_LARGE {
                    chunk.resize(READ_LARGE, 0);
                } else if n < READ_SMALL && chunk.len() > READ_SMALL {
                    chunk = vec![0u8; READ_SMALL];
                }
            }
            Some(Err(e)) => return failed(StreamError::Io, e),
        }
    }
}

/// How a stream ended: cleanly (`None`), or with an error and what is known of it.
pub(crate) type Ended = Option<(StreamError, String)>;

/// A stream that ended with `error`, because of `why`.
pub(crate) fn failed(error: StreamError, why: impl std::fmt::Display) -> Ended {
    Some((error, why.to_string()))
}

/// An I/O error as the user should read it: rustls's own, when it carries one (its custom
/// certificate errors print with `Debug` otherwise).
fn describe(e: &io::Error) -> String {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other))) => {
            format!("invalid peer certificate: {other}")
        }
        _ => e.to_string(),
    }
}

/// Reports `stream` open to the host.
pub(crate) fn opened<X: Extra>(shared: &Shared<X>, stream: StreamId, verified_identity: bool) {
    shared.drive(|host, _, now| {
        let open = Input::StreamOpen {
            stream,
            verified_identity,
        };
        host.handle_input(now, open);
    });
}

/// Reports the end of `stream` to the host and forgets its slot.
pub(crate) fn closed<X: Extra>(shared: &Shared<X>, stream: StreamId, ended: Ended) {
    let (error, detail) = match &ended {
        Some((error, why)) => (Some(*error), Some(why.as_str())),
        None => (None, None),
    };
    shared.drive(|host, io, now| {
        io.streams.remove(&stream);
        let closed = Input::StreamClosed {
            stream,
            error,
            detail,
        };
        host.handle_input(now, closed);
    });
}

/// `work`, unless the host aborts `stream` first (`None`).
pub(crate) async fn abortable<X: Extra, T>(
    shared: &Shared<X>,
    stream: StreamId,
    work: impl Future<Output = T>,
) -> Option<T> {
    let aborted = async {
        loop {
            let wake = {
                let state = shared.lock();
                match state.driver.streams.get(&stream) {
                    Some(slot) if !slot.abort && !state.driver.stopped => slot.wake.listen(),
                    _ => return None,
                }
            };
            wake.await;
        }
    };
    future::or(async { Some(work.await) }, aborted).await
}

/// `work`, or a timeout error at `deadline`.
pub(crate) async fn bounded<T>(
    deadline: Instant,
    work: impl Future<Output = io::Result<T>>,
) -> io::Result<T> {
    future::or(work, async {
        Timer::at(deadline).await;
        Err(io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    })
    .await
}

impl<X: Extra> Io<X> {
    /// Adds `sock` as `socket` with its task (replacing one held under that id).
    pub(crate) fn add_socket(
        &mut self,
        socket: SocketId,
        sock: Arc<Async<UdpSocket>>,
    ) -> std::io::Result<()> {
        let shared = self.me.upgrade().ok_or(std::io::ErrorKind::NotConnected)?;
        let sock = Arc::new(Udp::new(sock)?);
        self.sockets.insert(socket, sock.clone());
        let task = smol::spawn(async move { run_udp(&shared, socket, &sock).await });
        self.socket_tasks.insert(socket, task);
        Ok(())
    }
}
