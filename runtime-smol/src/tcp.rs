//! Inner TCP streams and listeners: connections between internal addresses over the tunnel's
//! TCP stack ([`tscf_core::inner::tcp`]), async like `async_net::TcpStream`.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::ops::Deref;
use std::pin::Pin;
use std::task::{Context, Poll};

use event_listener::EventListener;
use futures_lite::{AsyncRead, AsyncWrite};
use tscf_core::inner::{self, ListenerControl, StreamControl};

use crate::socket::Ready;

/// Tries `op` until it gives a value, listening before each retry so that a wake-up between
/// a try and the wait is not missed.
async fn wait_for<T>(
    ready: &Ready,
    mut op: impl FnMut() -> io::Result<Option<T>>,
) -> io::Result<T> {
    loop {
        if let Some(value) = op()? {
            return Ok(value);
        }
        let woken = ready.0.listen();
        if let Some(value) = op()? {
            return Ok(value);
        }
        woken.await;
    }
}

/// The same, as a poll: `wait` keeps the listener between polls.
fn poll_for<T>(
    ready: &Ready,
    wait: &mut Option<EventListener>,
    cx: &mut Context<'_>,
    mut op: impl FnMut() -> io::Result<Option<T>>,
) -> Poll<io::Result<T>> {
    loop {
        if let Some(value) = op()? {
            *wait = None;
            return Poll::Ready(Ok(value));
        }
        match wait {
            None => *wait = Some(ready.0.listen()),
            Some(listener) => {
                if Pin::new(listener).poll(cx).is_pending() {
                    return Poll::Pending;
                }
                *wait = None;
            }
        }
    }
}

/// A TCP connection between internal addresses, like `async_net::TcpStream`: made with
/// [`Tunnel::tcp_connect`](crate::Tunnel::tcp_connect) or accepted by an
/// [`InnerTcpListener`]. It is [`AsyncRead`] and [`AsyncWrite`] (closing it shuts down
/// writing); dropping it closes the connection. Its addresses, shutdown and peer tunneling
/// are [`StreamControl`]'s.
#[derive(Debug)]
pub struct InnerTcpStream {
    inner: inner::Stream<Ready>,
    reading: Option<EventListener>,
    writing: Option<EventListener>,
}

impl InnerTcpStream {
    /// Waits until the connection started by `stream` is made.
    pub(crate) async fn connected(stream: inner::Stream<Ready>) -> io::Result<Self> {
        wait_for(stream.ready(), || stream.try_connected()).await?;
        Ok(Self::new(stream))
    }

    fn new(inner: inner::Stream<Ready>) -> Self {
        Self {
            inner,
            reading: None,
            writing: None,
        }
    }
}

impl AsyncRead for InnerTcpStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = &this.inner;
        poll_for(stream.ready(), &mut this.reading, cx, || {
            stream.try_read(buf)
        })
    }
}

impl AsyncWrite for InnerTcpStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let stream = &this.inner;
        poll_for(stream.ready(), &mut this.writing, cx, || {
            stream.try_write(buf)
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.inner.shutdown(Shutdown::Write))
    }
}

impl Deref for InnerTcpStream {
    type Target = dyn StreamControl;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

/// A TCP listener on the tunnel's internal addresses, like `async_net::TcpListener`: made
/// with [`Tunnel::tcp_listen`](crate::Tunnel::tcp_listen). Dropping it stops listening. Its
/// address and peer tunneling are [`ListenerControl`]'s.
#[derive(Debug)]
pub struct InnerTcpListener(pub(crate) inner::Listener<Ready>);

impl InnerTcpListener {
    /// Waits for the next connection; the stream and the other end's address.
    pub async fn accept(&self) -> io::Result<(InnerTcpStream, SocketAddr)> {
        let stream = wait_for(self.0.ready(), || self.0.try_accept()).await?;
        let peer = stream.peer_addr()?;
        Ok((InnerTcpStream::new(stream), peer))
    }
}

impl Deref for InnerTcpListener {
    type Target = dyn ListenerControl;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}
