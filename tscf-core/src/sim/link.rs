//! Links and the simulator's random number source.
//!
//! A link is a full-duplex pipe between two nodes (a host and its site router, a site router and
//! the internet, or a host and the internet). Each direction applies the same [`LinkConfig`]
//! independently and keeps its own FIFO state, so jitter alone never reorders datagrams: only the
//! explicit `reorder` probability does.

use std::time::{Duration, Instant};

use rand_chacha::ChaCha20Rng;
use rand_core::{RngCore, SeedableRng};

use super::DropReason;

/// Impairments of one link, applied independently in each direction.
///
/// `Default` is an ideal link: no latency, no jitter, lossless, no duplication or reordering,
/// MTU 1500, up. Override fields with struct update syntax:
///
/// ```
/// # use std::time::Duration;
/// # use tscf_core::sim::LinkConfig;
/// let wan = LinkConfig { latency: Duration::from_millis(20), loss: 0.01, ..LinkConfig::default() };
/// # assert!(wan.up);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LinkConfig {
    /// Fixed one-way delay added to every datagram.
    pub latency: Duration,
    /// Extra one-way delay drawn uniformly from `0..=jitter` per datagram. Jitter never reorders:
    /// a datagram never overtakes one sent earlier in the same direction.
    pub jitter: Duration,
    /// Probability (`0.0..=1.0`) that a datagram is lost.
    pub loss: f64,
    /// Probability (`0.0..=1.0`) that a datagram is delivered twice.
    pub duplicate: f64,
    /// Probability (`0.0..=1.0`) that a datagram is held back by [`reorder_delay`](Self::reorder_delay),
    /// letting later datagrams overtake it.
    pub reorder: f64,
    /// Extra delay of a reordered datagram.
    pub reorder_delay: Duration,
    /// Largest IP packet in bytes (UDP payload plus 28 bytes of IPv4/UDP or 48 bytes of IPv6/UDP
    /// headers); larger datagrams are dropped and counted.
    pub mtu: usize,
    /// Whether the link carries traffic; a down link drops everything and resets streams over it.
    pub up: bool,
}

impl Default for LinkConfig {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_delay: Duration::from_millis(10),
            mtu: 1500,
            up: true,
        }
    }
}

impl LinkConfig {
    /// An otherwise ideal link with the given one-way latency.
    pub fn with_latency(latency: Duration) -> Self {
        Self {
            latency,
            ..Self::default()
        }
    }
}

/// Direction of travel over a link: `Up` is towards the internet, `Down` towards a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Dir {
    Up,
    Down,
}

impl Dir {
    fn index(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

/// Exit times of one datagram crossing a link: the original and, if duplicated, the copy.
#[derive(Debug, Clone, Copy)]
pub(super) struct Traversal {
    pub(super) exit: Instant,
    pub(super) duplicate: Option<Instant>,
}

/// A link's configuration and per-direction FIFO state.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) cfg: LinkConfig,
    /// Latest exit time per direction of an in-order datagram, so later ones never overtake it.
    last_exit: [Instant; 2],
}

impl Link {
    pub(super) fn new(cfg: LinkConfig, now: Instant) -> Self {
        Self {
            cfg,
            last_exit: [now; 2],
        }
    }

    /// Sends a datagram of `ip_len` bytes into the link at `now`.
    pub(super) fn traverse(
        &mut self,
        dir: Dir,
        now: Instant,
        ip_len: usize,
        rng: &mut SimRng,
    ) -> Result<Traversal, DropReason> {
        if !self.cfg.up {
            return Err(DropReason::LinkDown);
        }
        if ip_len > self.cfg.mtu {
            return Err(DropReason::Mtu);
        }
        if rng.chance(self.cfg.loss) {
            return Err(DropReason::Loss);
        }
        let exit = if rng.chance(self.cfg.reorder) {
            // Held back outside the FIFO order so that later datagrams overtake it.
            now + self.delay(rng) + self.cfg.reorder_delay
        } else {
            self.in_order_exit(dir, now, rng)
        };
        let duplicate = if rng.chance(self.cfg.duplicate) {
            Some(self.in_order_exit(dir, now, rng))
        } else {
            None
        };
        Ok(Traversal { exit, duplicate })
    }

    /// Exit time of a reliable, in-order transfer (streams): latency and jitter, FIFO, no loss.
    pub(super) fn delay(&self, rng: &mut SimRng) -> Duration {
        self.cfg.latency + rng.duration_up_to(self.cfg.jitter)
    }

    fn in_order_exit(&mut self, dir: Dir, now: Instant, rng: &mut SimRng) -> Instant {
        let delay = self.delay(rng);
        let last = &mut self.last_exit[dir.index()];
        let exit = (now + delay).max(*last);
        *last = exit;
        exit
    }
}

/// Deterministic random source of a simulation run.
#[derive(Debug)]
pub(super) struct SimRng(ChaCha20Rng);

impl SimRng {
    pub(super) fn new(seed: u64) -> Self {
        Self(ChaCha20Rng::seed_from_u64(seed))
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        // 53 random bits fill an f64 mantissa exactly.
        (self.0.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// True with probability `p`; draws nothing when `p <= 0` so unimpaired links cost nothing.
    pub(super) fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && (p >= 1.0 || self.unit() < p)
    }

    /// Uniform in `0..n`; `n` must be non-zero.
    pub(super) fn below(&mut self, n: u64) -> u64 {
        // Multiply-shift maps 64 random bits onto 0..n; the bias is below 2^-40 for our ranges.
        ((u128::from(self.0.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Uniform in `0..=max`.
    pub(super) fn duration_up_to(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        let nanos = u64::try_from(max.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(self.below(nanos.saturating_add(1)))
    }
}
