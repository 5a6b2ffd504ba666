//! Inner TCP streams and listeners as both runtimes hold them: an id in the tunnel's
//! [`TcpStack`](super::tcp::TcpStack), the way to the tunnel ([`TcpHost`]) and the runtime's
//! wake-up. Each runtime's `InnerTcpStream` and `InnerTcpListener` wrap these and wait in its
//! own way (blocking or async) between the non-blocking tries offered here.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::sync::Arc;

use super::tcp::{TcpHost, TcpId};
use super::Ready;

/// What an application steers of an inner TCP stream, whichever runtime drives it: each
/// runtime's `InnerTcpStream` dereferences to it and adds reading and writing in its own
/// style.
pub trait StreamControl: Send + Sync {
    /// The tunnel's internal address and the local port.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// The other end's internal address and port.
    fn peer_addr(&self) -> io::Result<SocketAddr>;
    /// Shuts down reading, writing (the other end reads the end of the stream after what
    /// was written) or both.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// Opts this stream's local port in or out of peer tunneling (see
    /// [`SocketControl::set_peer_tunneling`](super::SocketControl::set_peer_tunneling)): the
    /// connection moves to a peer tunnel once one is up and back to the relay if it goes down,
    /// and goes on across both moves. The setting belongs to the port: for an accepted stream
    /// it is the listener's, shared by every stream it accepted.
    fn set_peer_tunneling(&self, enabled: bool);
}

/// An inner TCP stream: dropping it closes it (a reset if unread data remains).
pub struct Stream<W> {
    id: TcpId,
    ready: Arc<W>,
    tunnel: Arc<dyn TcpHost>,
}

impl<W: Ready + Default + 'static> Stream<W> {
    /// Starts a connection to `dst` through `tunnel`; wait for
    /// [`try_connected`](Self::try_connected).
    pub fn connect(tunnel: Arc<dyn TcpHost>, dst: SocketAddr) -> io::Result<Self> {
        let ready = Arc::new(W::default());
        let id = tunnel.connect(dst, ready.clone())?;
        Ok(Self { id, ready, tunnel })
    }
}

impl<W> Stream<W> {
    /// The runtime's wake-up of this stream: woken when it may have become readable,
    /// writable, connected or closed.
    pub fn ready(&self) -> &W {
        &self.ready
    }

    /// Whether the connection is made: `Ok(None)` during the handshake, an error if it was
    /// refused or timed out.
    pub fn try_connected(&self) -> io::Result<Option<()>> {
        self.tunnel.connected(self.id)
    }

    /// Reads what arrived into `buf`: `Ok(Some(0))` at the end of the stream, `Ok(None)`
    /// when nothing waits yet.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        self.tunnel.recv(self.id, buf)
    }

    /// Writes what the send buffer takes of `buf`; `Ok(None)` when it is full.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<Option<usize>> {
        self.tunnel.send(self.id, buf)
    }
}

impl<W: Send + Sync> StreamControl for Stream<W> {
    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.tunnel.addrs(self.id)?.0)
    }

    fn peer_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.tunnel.addrs(self.id)?.1)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tunnel.shutdown(self.id, how)
    }

    fn set_peer_tunneling(&self, enabled: bool) {
        if let Ok((local, _)) = self.tunnel.addrs(self.id) {
            self.tunnel.set_peer_tunneling(local.port(), enabled);
        }
    }
}

impl<W> std::fmt::Debug for Stream<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<W> Drop for Stream<W> {
    fn drop(&mut self) {
        self.tunnel.close(self.id);
    }
}

/// An inner TCP listener: dropping it stops listening.
pub struct Listener<W> {
    port: u16,
    ready: Arc<W>,
    tunnel: Arc<dyn TcpHost>,
}

impl<W: Ready + Default + 'static> Listener<W> {
    /// Listens on `port` of the tunnel's internal addresses (0 picks a free one).
    pub fn bind(tunnel: Arc<dyn TcpHost>, port: u16) -> io::Result<Self> {
        let ready = Arc::new(W::default());
        let port = tunnel.listen(port, ready.clone())?;
        Ok(Self {
            port,
            ready,
            tunnel,
        })
    }

    /// The oldest connection waiting, if one does.
    pub fn try_accept(&self) -> io::Result<Option<Stream<W>>> {
        let ready = Arc::new(W::default());
        let Some(id) = self.tunnel.accept(self.port, ready.clone())? else {
            return Ok(None);
        };
        Ok(Some(Stream {
            id,
            ready,
            tunnel: self.tunnel.clone(),
        }))
    }
}

impl<W> Listener<W> {
    /// The runtime's wake-up of this listener: woken when connections may wait.
    pub fn ready(&self) -> &W {
        &self.ready
    }
}

/// What an application steers of an inner TCP listener, whichever runtime drives it: each
/// runtime's `InnerTcpListener` dereferences to it and adds `accept` in its own style.
pub trait ListenerControl: Send + Sync {
    /// The port it listens on.
    fn port(&self) -> u16;
    /// The tunnel's internal address (IPv4 first) with the port it listens on.
    fn local_addr(&self) -> io::Result<SocketAddr>;
    /// Opts the port in or out of peer tunneling, for every stream it accepts (see
    /// [`StreamControl::set_peer_tunneling`]).
    fn set_peer_tunneling(&self, enabled: bool);
}

impl<W: Send + Sync> ListenerControl for Listener<W> {
    fn port(&self) -> u16 {
        self.port
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tunnel.local_addr(self.port)
    }

    fn set_peer_tunneling(&self, enabled: bool) {
        self.tunnel.set_peer_tunneling(self.port, enabled);
    }
}

impl<W> std::fmt::Debug for Listener<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listener")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl<W> Drop for Listener<W> {
    fn drop(&mut self) {
        self.tunnel.unlisten(self.port);
    }
}
