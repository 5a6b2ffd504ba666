//! Inner TCP streams and listeners: connections between internal addresses over the tunnel's
//! TCP stack ([`tscf_core::inner::tcp`]), blocking like [`std::net::TcpStream`].

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::{Condvar, Mutex};

use tscf_core::inner::{self, ListenerControl, StreamControl};

use crate::lock;

/// The wake-up of an inner stream or listener: a count of wake-ups and a condition variable,
/// so that a wake-up between a try and the wait is not missed.
#[derive(Debug, Default)]
pub(crate) struct Signal {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Signal {
    /// Tries `op` until it gives a value, waiting for a wake-up after each miss.
    fn wait_for<T>(&self, mut op: impl FnMut() -> io::Result<Option<T>>) -> io::Result<T> {
        loop {
            let seen = *lock(&self.count);
            if let Some(value) = op()? {
                return Ok(value);
            }
            let mut count = lock(&self.count);
            while *count == seen {
                count = self.changed.wait(count).unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

impl inner::Ready for Signal {
    fn one(&self) {
        self.all();
    }

    fn all(&self) {
        *lock(&self.count) += 1;
        self.changed.notify_all();
    }
}

/// A TCP connection between internal addresses, like [`std::net::TcpStream`]: made with
/// [`Tunnel::tcp_connect`](crate::Tunnel::tcp_connect) or accepted by an
/// [`InnerTcpListener`]. Reads and writes block; dropping it closes the connection. Its
/// addresses, shutdown and peer tunneling are [`StreamControl`]'s.
#[derive(Debug)]
pub struct InnerTcpStream(pub(crate) inner::Stream<Signal>);

impl InnerTcpStream {
    /// Waits until the connection started by `stream` is made.
    pub(crate) fn connected(stream: inner::Stream<Signal>) -> io::Result<Self> {
        stream.ready().wait_for(|| stream.try_connected())?;
        Ok(Self(stream))
    }
}

impl Read for &InnerTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.ready().wait_for(|| self.0.try_read(buf))
    }
}

impl Write for &InnerTcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.ready().wait_for(|| self.0.try_write(buf))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for InnerTcpStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl Write for InnerTcpStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*self).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Deref for InnerTcpStream {
    type Target = dyn StreamControl;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// A TCP listener on the tunnel's internal addresses, like [`std::net::TcpListener`]: made
/// with [`Tunnel::tcp_listen`](crate::Tunnel::tcp_listen). Dropping it stops listening. Its
/// address and peer tunneling are [`ListenerControl`]'s.
#[derive(Debug)]
pub struct InnerTcpListener(pub(crate) inner::Listener<Signal>);

impl InnerTcpListener {
    /// Waits for the next connection; the stream and the other end's address.
    pub fn accept(&self) -> io::Result<(InnerTcpStream, SocketAddr)> {
        let stream = self.0.ready().wait_for(|| self.0.try_accept())?;
        let peer = stream.peer_addr()?;
        Ok((InnerTcpStream(stream), peer))
    }
}

impl Deref for InnerTcpListener {
    type Target = dyn ListenerControl;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
