//! Bytes over a blocking TCP stream, plain or TLS.
//!
//! A connection is split into a [`StreamReader`] (one thread blocks in `read`) and a
//! [`StreamWriter`] (the stream's writer thread). With TLS both halves share the rustls
//! connection behind a mutex that is never held while blocking in `read`, and never while
//! calling into a host, so it nests inside the host's lock and not the other way round.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::lock;

/// Octets read from the socket at a time.
const READ_CHUNK: usize = 16 * 1024;

/// Why a stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StreamError {
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
    #[error("TLS: {}", describe_tls(.0))]
    Tls(#[from] rustls::Error),
}

/// rustls prints a custom certificate error with `Debug`; ours deserve their own message.
fn describe_tls(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) => {
            format!("invalid peer certificate: {other}")
        }
        other => other.to_string(),
    }
}

type SharedTls = Arc<Mutex<rustls::Connection>>;

/// Runs the TLS handshake on `sock` to completion, or fails at `deadline` (or when the socket
/// is shut down from another thread).
pub(crate) fn handshake(
    sock: &mut TcpStream,
    conn: &mut rustls::Connection,
    deadline: Instant,
) -> Result<(), StreamError> {
    while conn.is_handshaking() || conn.wants_write() {
        if conn.wants_write() {
            conn.write_tls(sock)?;
            continue;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out").into());
        }
        sock.set_read_timeout(Some(remaining))?;
        if conn.read_tls(sock)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed during the TLS handshake",
            )
            .into());
        }
        if let Err(e) = conn.process_new_packets() {
            // Tell the peer why (the alert is queued by rustls).
            let _ = conn.write_tls(sock);
            return Err(e.into());
        }
    }
    sock.set_read_timeout(None)?;
    Ok(())
}

/// Splits a connected (and, for TLS, handshaken) socket.
pub(crate) fn split(
    sock: TcpStream,
    tls: Option<rustls::Connection>,
) -> io::Result<(StreamReader, StreamWriter)> {
    let tls = tls.map(|c| Arc::new(Mutex::new(c)));
    let writer = StreamWriter {
        sock: sock.try_clone()?,
        tls: tls.clone(),
    };
    let reader = StreamReader {
        sock,
        tls,
        chunk: vec![0; READ_CHUNK],
        plain: Vec::new(),
        primed: false,
    };
    Ok((reader, writer))
}

/// The sending half.
#[derive(Debug)]
pub(crate) struct StreamWriter {
    sock: TcpStream,
    tls: Option<SharedTls>,
}

impl StreamWriter {
    /// Writes `bytes` (whole envelopes).
    pub(crate) fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        match &self.tls {
            None => self.sock.write_all(bytes),
            Some(tls) => {
                let mut conn = lock(tls);
                conn.writer().write_all(bytes)?;
                while conn.wants_write() {
                    conn.write_tls(&mut self.sock)?;
                }
                Ok(())
            }
        }
    }

    /// Ends the connection (with a TLS close_notify) in both directions.
    pub(crate) fn close(&mut self) {
        if let Some(tls) = &self.tls {
            let mut conn = lock(tls);
            conn.send_close_notify();
            let _ = conn.write_tls(&mut self.sock);
        }
        let _ = self.sock.shutdown(Shutdown::Both);
    }
}

/// The receiving half.
#[derive(Debug)]
pub(crate) struct StreamReader {
    sock: TcpStream,
    tls: Option<SharedTls>,
    chunk: Vec<u8>,
    plain: Vec<u8>,
    /// Plaintext buffered during the handshake has been taken.
    primed: bool,
}

impl StreamReader {
    /// Blocks until bytes arrive and returns them (decrypted); empty once the peer closed the
    /// stream cleanly.
    pub(crate) fn read(&mut self) -> Result<&[u8], StreamError> {
        let Some(tls) = &self.tls else {
            let n = self.sock.read(&mut self.chunk)?;
            return Ok(&self.chunk[..n]);
        };
        loop {
            // The handshake may have read application data already: take it first.
            let n = if self.primed {
                let n = self.sock.read(&mut self.chunk)?;
                if n == 0 {
                    return Ok(&[]);
                }
                n
            } else {
                self.primed = true;
                0
            };
            let open = decrypt(tls, &mut self.sock, &self.chunk[..n], &mut self.plain)?;
            if !self.plain.is_empty() || !open {
                return Ok(&self.plain);
            }
        }
    }
}

/// Feeds `tls_bytes` to rustls and collects the plaintext into `plain`; returns false once the
/// peer sent close_notify.
fn decrypt(
    tls: &SharedTls,
    sock: &mut TcpStream,
    mut tls_bytes: &[u8],
    plain: &mut Vec<u8>,
) -> Result<bool, StreamError> {
    plain.clear();
    let mut conn = lock(tls);
    let mut open = true;
    loop {
        if !tls_bytes.is_empty() {
            conn.read_tls(&mut tls_bytes)?;
            if let Err(e) = conn.process_new_packets() {
                let _ = conn.write_tls(sock);
                return Err(e.into());
            }
        }
        let mut chunk = [0u8; 4096];
        loop {
            match conn.reader().read(&mut chunk) {
                Ok(0) => {
                    open = false;
                    break;
                }
                Ok(n) => plain.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        if tls_bytes.is_empty() {
            break;
        }
    }
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(open)
}
