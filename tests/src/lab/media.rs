//! A small UDP media stream from inside a client namespace: one datagram every interval to a
//! `tscf client` forward, and the arrival time of every datagram coming back.

use std::fs::File;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Datagram size of the stream (a small voice frame).
const FRAME: usize = 160;

/// One endpoint of a media stream; stops on drop.
pub struct Media {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

struct Shared {
    /// The size of the datagrams sent, and of those counted when received.
    frame: usize,
    stop: AtomicBool,
    paused: AtomicBool,
    sent: AtomicU64,
    arrivals: Mutex<Vec<Instant>>,
}

/// What a [`Media`] endpoint saw.
#[derive(Clone, Copy, Debug)]
pub struct MediaStats {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams received.
    pub received: usize,
}

impl Media {
    /// Starts sending to `to` (a forward's local address) every `interval` from a socket
    /// bound to 127.0.0.1 in namespace `ns`, and recording what comes back.
    pub fn start(ns: &str, to: SocketAddr, interval: Duration) -> io::Result<Self> {
        Self::start_sized(ns, to, interval, FRAME)
    }

    /// [`start`](Self::start) with datagrams of `frame` octets (at least 8), and only those
    /// counted when they come back.
    pub fn start_sized(
        ns: &str,
        to: SocketAddr,
        interval: Duration,
        frame: usize,
    ) -> io::Result<Self> {
        let (mut media, socket) = Self::receiving(ns, frame)?;
        let tx = socket;
        let s = media.shared.clone();
        let sender = std::thread::spawn(move || {
            let mut frame = vec![0u8; s.frame.max(8)];
            let mut next = Instant::now();
            while !s.stop.load(Ordering::Relaxed) {
                if !s.paused.load(Ordering::Relaxed) {
                    let seq = s.sent.fetch_add(1, Ordering::Relaxed);
                    frame[..8].copy_from_slice(&seq.to_be_bytes());
                    let _ = tx.send_to(&frame, to);
                }
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        media.threads.push(sender);
        Ok(media)
    }

    /// A receiver that never sends, on 127.0.0.1 in namespace `ns`, counting datagrams of
    /// `frame` octets; its address (for `tscf client --listen`).
    pub fn listen(ns: &str, frame: usize) -> io::Result<(Self, SocketAddr)> {
        let (media, socket) = Self::receiving(ns, frame)?;
        let addr = socket.local_addr()?;
        Ok((media, addr))
    }

    /// The receiving half; a clone of its socket, for a sender.
    fn receiving(ns: &str, frame: usize) -> io::Result<(Self, UdpSocket)> {
        let socket = socket_in(ns)?;
        socket.set_read_timeout(Some(Duration::from_millis(50)))?;
        let shared = Arc::new(Shared {
            frame,
            stop: AtomicBool::new(false),
            paused: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
        });
        let tx = socket.try_clone()?;
        let s = shared.clone();
        let receiver = std::thread::spawn(move || {
            let mut buf = vec![0u8; 65_536];
            while !s.stop.load(Ordering::Relaxed) {
                if let Ok((n, _)) = socket.recv_from(&mut buf) {
                    if n == s.frame {
                        s.arrivals
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(Instant::now());
                    }
                }
            }
        });
        let media = Media {
            shared,
            threads: vec![receiver],
        };
        Ok((media, tx))
    }

    /// Stops sending (receiving goes on); what was sent stays counted.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Relaxed);
    }

    /// Sends again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Relaxed);
    }

    /// Counters so far.
    pub fn stats(&self) -> MediaStats {
        MediaStats {
            sent: self.shared.sent.load(Ordering::Relaxed),
            received: self.arrivals().len(),
        }
    }

    /// Datagrams received after `t`.
    pub fn received_after(&self, t: Instant) -> usize {
        self.arrivals().iter().filter(|&&a| a > t).count()
    }

    /// Waits until `count` datagrams arrived after `t` (at most `timeout`); when the first of
    /// them arrived.
    pub fn wait_received_after(
        &self,
        t: Instant,
        count: usize,
        timeout: Duration,
    ) -> Option<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            {
                let arrivals = self.arrivals();
                let after: Vec<_> = arrivals.iter().filter(|&&a| a > t).collect();
                if after.len() >= count {
                    return after.first().map(|&&a| a);
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The longest silence between two arrivals after `t` (or between `t` and the first).
    pub fn longest_gap_after(&self, t: Instant) -> Duration {
        let arrivals = self.arrivals();
        let mut last = t;
        let mut gap = Duration::ZERO;
        for &a in arrivals.iter().filter(|&&a| a > t) {
            gap = gap.max(a - last);
            last = a;
        }
        gap
    }

    fn arrivals(&self) -> std::sync::MutexGuard<'_, Vec<Instant>> {
        self.shared
            .arrivals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Media {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A UDP socket on 127.0.0.1 in namespace `ns`: made by a thread that enters the namespace
/// and ends; a socket stays in the namespace it was made in.
fn socket_in(ns: &str) -> io::Result<UdpSocket> {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = File::open(&path)?;
            rustix::thread::move_into_link_name_space(
                f.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )?;
            UdpSocket::bind("127.0.0.1:0")
        })
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("namespace thread panicked")))
    })
}
