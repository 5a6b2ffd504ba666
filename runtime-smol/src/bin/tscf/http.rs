//! A minimal HTTP/1.1 endpoint for the metrics: `GET /metrics` and nothing else, one answer
//! per connection (`Connection: close`).
//!
//! Bounded in every way a scraper or a stranger could stretch it: at most
//! [`MAX_CONNECTIONS`] at once (more are closed at accept), a request head of at most
//! [`MAX_REQUEST`] octets, and [`EXCHANGE_TIMEOUT`] for the whole exchange, reading and
//! writing. The body is made only once a request is complete.

use std::cell::Cell;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};
use smol::{Async, LocalExecutor};

/// Connections served at once, at most.
pub(crate) const MAX_CONNECTIONS: usize = 8;
/// Octets of a request head, at most.
pub(crate) const MAX_REQUEST: usize = 8 * 1024;
/// How long one exchange may take, reading the request and writing the answer.
pub(crate) const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// What `GET /metrics` answers: the content type and the body.
pub(crate) type Answer = (&'static str, String);

/// Binds the metrics listener.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Async<TcpListener>> {
    Async::<TcpListener>::bind(addr)
}

/// Answers scrapers forever; `metrics` makes each answer to `GET /metrics`. Exchanges run
/// side by side on a local executor, so that `metrics` may borrow.
pub(crate) async fn serve<F: Fn() -> Answer>(listener: &Async<TcpListener>, metrics: F) {
    let open = Cell::new(0usize);
    let executor = LocalExecutor::new();
    executor
        .run(async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    // Out of descriptors, most likely: wait a little rather than spin.
                    smol::Timer::after(Duration::from_millis(50)).await;
                    continue;
                };
                if open.get() >= MAX_CONNECTIONS {
                    continue;
                }
                open.set(open.get() + 1);
                let (open, metrics) = (&open, &metrics);
                executor
                    .spawn(async move {
                        futures_lite::future::or(exchange(stream, metrics), async {
                            smol::Timer::after(EXCHANGE_TIMEOUT).await;
                        })
                        .await;
                        open.set(open.get() - 1);
                    })
                    .detach();
            }
        })
        .await;
}

/// Reads one request head and writes one answer.
async fn exchange<F: Fn() -> Answer>(mut stream: Async<std::net::TcpStream>, metrics: &F) {
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= MAX_REQUEST {
            let _ = respond(&mut stream, 431, "text/plain", "request too large\n").await;
            // Closing with unread input would reset the connection, and the client might
            // lose the answer: read a little more first, briefly.
            let _ = stream.get_ref().shutdown(std::net::Shutdown::Write);
            let drain = async {
                let mut left = 64 * 1024;
                while let Ok(n @ 1..) = stream.read(&mut chunk).await {
                    left -= n.min(left);
                    if left == 0 {
                        break;
                    }
                }
            };
            futures_lite::future::or(drain, async {
                smol::Timer::after(Duration::from_secs(1)).await;
            })
            .await;
            return;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n.min(MAX_REQUEST - head.len())]),
        }
    }
    let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut words = line.split(' ');
    let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let _ = match (method, path) {
        ("GET", "/metrics") => {
            let (content_type, body) = metrics();
            respond(&mut stream, 200, content_type, &body).await
        }
        ("GET", _) => respond(&mut stream, 404, "text/plain", "try /metrics\n").await,
        _ => respond(&mut stream, 405, "text/plain", "only GET\n").await,
    };
}

async fn respond(
    stream: &mut Async<std::net::TcpStream>,
    status: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Request Header Fields Too Large",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.flush().await
}
